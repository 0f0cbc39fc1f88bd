"""Bytes between a JPEG's last scan and its end marker, through both loaders' entry points
(load_rgb: the torchvision backend; checked_size: DALI's check on a file's first read).

libjpeg says "N extraneous bytes before marker 0xd9" both for padding after a whole scan and for
the rest of a scan that damage made the decoder finish early; only zero padding may pass."""
import io
import re

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from directclr.data.images import CorruptImageError, checked_size, load_rgb

END = b"\xff\xd9"
ENTRY_POINTS = {"torchvision": load_rgb, "dali": lambda path: checked_size(path, path.read_bytes())}


def photo(height, width, seed=0):
    """Waves in random colours with noise: every block has detail, as in a photograph."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    waves = np.sin(2 * np.pi * (rng.uniform(2, 6) * xs + rng.uniform(1, 4) * ys))
    waves += np.cos(9 * xs * ys)
    pixels = (127 + waves[..., None] * rng.uniform(-100, 100, 3)
              + rng.normal(0, 12, (height, width, 3)))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def letterboxed(height, width, band_from):
    """A photo whose rows from `band_from` on are flat grey: under the standard Huffman tables
    each of its 16x16 blocks codes as the 4 bytes 28 a2 8a 00."""
    pixels = np.asarray(photo(height, width)).copy()
    pixels[band_from:] = 128
    return Image.fromarray(pixels)


def encode(image, **save):
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, **save)
    return out.getvalue()


def pad(data, padding):
    """`padding` inserted before the end marker, i.e. after the last scan."""
    end = data.rindex(END)
    return data[:end] + padding + data[end:]


def overwrite(data, fraction, length, seed):
    """`length` random bytes written over the entropy-coded data, `fraction` of the way in."""
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")  # past the SOS header
    at = start + int(fraction * (data.rindex(END) - start))
    junk = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
    return data[:at] + junk + data[at + length:]


def skipped_before_end(data):
    """How many bytes libjpeg reports skipping before the end marker, None if it does not."""
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1, min_width=1)
    except ValueError as err:
        found = re.fullmatch(r"Corrupt JPEG data: (\d+) extraneous bytes before marker 0xd9",
                             str(err))
        return int(found.group(1)) if found else None
    return None


def rows_changed(original, damaged):
    """Rows of PIL's decode (what both loaders would train on) off by more than 10/255."""
    pixels = [np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=float)
              for data in (original, damaged)]
    return int((np.abs(pixels[0] - pixels[1]).mean(axis=1) > 10).sum())


def assert_refused_naming_the_file(path, skipped):
    for name, entry in ENTRY_POINTS.items():
        with pytest.raises(CorruptImageError) as caught:
            entry(path)
        assert caught.value.path == str(path), name
        assert str(caught.value).startswith(
            f"cannot decode image {path}: Corrupt JPEG data: {skipped} extraneous bytes before "
            "marker 0xd9 (not zero padding"), name


PADDED = {
    "240 zero bytes": lambda: pad(encode(photo(160, 240)), bytes(240)),
    "4096 zero bytes": lambda: pad(encode(photo(160, 240)), bytes(4096)),
    # libjpeg's bit buffer has read 7 of these before it counts: it reports 1.
    "8 zero bytes": lambda: pad(encode(photo(160, 240)), bytes(8)),
    # libjpeg neither counts the 0xff fill nor the end marker's.
    "zeros then 0xff fill": lambda: pad(encode(photo(160, 240)), bytes(100) + b"\xff" * 5),
    # The end marker that counts is the first: the second picture's lies after it.
    "zeros, then a second picture": lambda: (pad(encode(photo(160, 240)), bytes(100))
                                             + encode(photo(64, 64, seed=1))),
    "zeros, progressive": lambda: pad(encode(photo(160, 240), progressive=True), bytes(240)),
    "zeros, greyscale": lambda: pad(encode(photo(160, 240).convert("L")), bytes(240)),
    # The scan's own last byte is 0x00 (flat chroma blocks), which the decoder needs.
    "zeros after a flat band": lambda: pad(encode(letterboxed(240, 320, 60)), bytes(240)),
}


@pytest.mark.parametrize("padding", PADDED)
def test_zero_padding_after_the_last_scan_passes(padding, tmp_path):
    data = PADDED[padding]()
    assert skipped_before_end(data)  # the rule is what lets it through, not a silent libjpeg
    path = tmp_path / "padded.jpg"
    path.write_bytes(data)
    assert load_rgb(path).size == checked_size(path, data)[::-1]


# The fault campaign's damage (40 bytes overwritten mid-scan) and others like it: the decoder
# loses its place, finishes the image's blocks early and leaves the scan's last bytes over.
DAMAGES = [
    # (height, width, fraction of the scan, bytes overwritten, seed)
    (160, 240, 0.5, 40, 2),
    (160, 240, 0.5, 40, 3),
    (160, 160, 0.5, 40, 0),
    (160, 240, 0.2, 40, 0),
    (160, 240, 0.8, 16, 2),
    (160, 240, 0.5, 100, 4),
]


@pytest.mark.parametrize("height, width, fraction, length, seed", DAMAGES)
def test_the_rest_of_a_damaged_scan_is_refused_naming_the_file(height, width, fraction, length,
                                                              seed, tmp_path):
    original = encode(photo(height, width))
    damaged = overwrite(original, fraction, length, seed)
    skipped = skipped_before_end(damaged)
    assert skipped > 30  # what the check used to let through as padding
    assert rows_changed(original, damaged) >= 16
    path = tmp_path / "damaged.jpg"
    path.write_bytes(damaged)
    assert_refused_naming_the_file(path, skipped)


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_a_damaged_scan_whose_rest_ends_in_a_zero_byte_is_refused(seed, tmp_path):
    """The bytes libjpeg skips are one 0x00, as padding's are: the chroma of the flat band's
    last block. Its non-zero bytes, which the decoder did not need either, give it away."""
    original = encode(letterboxed(240, 320, 60))
    damaged = overwrite(original, 0.015, 40, seed)
    skipped = skipped_before_end(damaged)
    assert damaged[damaged.rindex(END) - skipped - 1:].startswith(b"\x8a" + bytes(skipped))
    assert rows_changed(original, damaged) >= 16
    path = tmp_path / "damaged.jpg"
    path.write_bytes(damaged)
    assert_refused_naming_the_file(path, skipped)


@pytest.mark.parametrize("trailer", [b"Created with Foo 1.0", bytes(range(1, 200))])
def test_non_zero_bytes_before_the_end_marker_are_refused_whatever_wrote_them(trailer, tmp_path):
    """A damaged scan's rest is such bytes too: nothing in them tells the two apart."""
    path = tmp_path / "trailer.jpg"
    path.write_bytes(pad(encode(photo(160, 240)), trailer))
    assert_refused_naming_the_file(path, skipped_before_end(path.read_bytes()))
