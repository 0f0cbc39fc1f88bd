"""Decoding that reports a damaged image the same way in both backends: an error naming the file.

libjpeg treats damaged entropy-coded data (a bad Huffman code, a segment that ends early, bytes
left over before a marker) as a warning, decodes on and fills what it lost with flat blocks.
PIL, DALI's CPU decoder (nvImageCodec's libjpeg-turbo, which even falls back to a second decoder
on a stray marker) and torchvision.io drop those warnings or print them at most, so such a file
would train as a damaged picture; none of them has an option to fail instead. simplejpeg's
strict mode (TurboJPEG's stop-on-warning) raises on them. Decoding to grey at 1/8 scale still
entropy-decodes every block, which is where the damage shows, and skips most of the IDCT,
upsampling and colour conversion: 0.5 ms for a 500x375 JPEG on one core, against 1.1 ms for
PIL's full decode and ~13 ms for the torchvision backend's whole sample (two views at 224).

One warning means padding as often as damage: "N extraneous bytes before marker 0xd9". Cameras
pad the last scan with zero bytes (ImageNet's train set holds such files), and a scan that
damage threw out of step can finish the image's blocks early and leave its own last bytes over
(about 40% of files with 40 bytes overwritten mid-scan): libjpeg words both alike. Such bytes
pass only as zero padding, all 0x00 after the last byte the decoder needs. Making sure takes a
second decode, for those files only: 1.4 ms against 0.6 ms for a zero-padded 500x375 JPEG,
measured side by side on one busy core; other files cost what they did. Non-zero bytes there
are refused whatever wrote them: the rest of a damaged scan is such bytes too.

libjpeg cannot see every damage: zeroed bytes can decode as valid codes, a rest of up to 8 bytes
lies in its bit buffer's read-ahead, which it never reports, and a rest that is all zeros (flat
blocks under optimised Huffman tables) is byte for byte a whole scan and zero padding. What it
cannot see, neither backend reports.
"""
from __future__ import annotations

import io
import re

import simplejpeg
from PIL import Image, UnidentifiedImageError

JPEG_START = b"\xff\xd8"
JPEG_END = b"\xff\xd9"
_START_OF_SCAN = 0xDA
# In entropy-coded data 0xff is followed by 0x00 (a stuffed data byte), a restart marker
# (0xd0-0xd7) or more 0xff (fill); anything else ends the scan. Spelt "\xff\xff*", not
# "\xff+", so that re finds its first byte by its literal-prefix search: 50 times faster.
_MARKER_IN_SCAN = re.compile(rb"\xff\xff*[^\x00\xd0-\xd7\xff]")
_SKIPPED_BEFORE_END = re.compile(r"Corrupt JPEG data: (\d+) extraneous bytes before marker 0xd9")


class CorruptImageError(ValueError):
    """An image file that cannot be decoded, or whose decoder reports damage."""

    def __init__(self, path, reason):
        # Two arguments on purpose: torch's DataLoader cannot rebuild this type from a worker's
        # traceback text, so a worker's error reaches the caller as a RuntimeError, which
        # TorchvisionSource replaces by this one-line error.
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path = str(path)


def check_jpeg(path, data: bytes) -> None:
    """Raises CorruptImageError where libjpeg finds `data` (a JPEG) damaged; other formats pass."""
    if not data.startswith(JPEG_START):
        return
    try:
        _strict_decode(data)
    except ValueError as err:
        skipped = _SKIPPED_BEFORE_END.search(str(err))
        if skipped is None:
            raise CorruptImageError(path, err) from err
        if not _is_zero_padding(data, int(skipped.group(1))):
            raise CorruptImageError(path, f"{err} (not zero padding: a damaged scan that "
                                          "ends early leaves its last bytes over)") from err


def _strict_decode(data: bytes) -> None:
    simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1, min_width=1)


def _is_zero_padding(data: bytes, skipped: int) -> bool:
    """Whether all bytes after the last one the entropy decoder needed are 0x00, `skipped`
    being how many libjpeg counted before the end marker.

    The count alone cannot tell (libjpeg's bit buffer has read up to 8 bytes past the last
    block before it counts), so: the skipped bytes must be the tail of a run of zeros, and the
    decoder must need the last non-zero byte before that run (the file cut before it runs short
    of data). The rest of a scan that ended early fails one or the other unless all of it is
    zeros, also where it ends in zero bytes, as flat chroma blocks under the standard tables
    code: its non-zero bytes lie between where the decoder stopped and those zeros.
    """
    end = _end_marker(data)
    if end is None:
        return False
    before_end = data[:end].rstrip(b"\xff")  # fill before a marker, which libjpeg does not count
    data_end = len(before_end.rstrip(b"\x00"))
    if len(before_end) - data_end < skipped:
        return False
    try:
        _strict_decode(data[:data_end - 1] + JPEG_END)
    except ValueError as err:
        return "premature end of data segment" in str(err)
    return False


def _end_marker(data: bytes) -> int | None:
    """Offset of the end marker that libjpeg stopped at, found segment by segment: an EXIF
    thumbnail's end marker lies inside a segment, a trailer's (a second picture) after it."""
    pos = len(JPEG_START)
    while pos + 1 < len(data):
        if data[pos] != 0xFF:
            return None
        if data[pos:pos + 2] == JPEG_END:
            return pos
        marker = data[pos + 1]
        if marker == 0xFF:  # fill before a marker
            pos += 1
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == _START_OF_SCAN:
            scan_end = _MARKER_IN_SCAN.search(data, pos)
            if scan_end is None:
                return None
            pos = scan_end.end() - 2
    return None


def load_rgb(path) -> Image.Image:
    """The whole image of a file as RGB, decoded now; a file that cannot be read raises
    OSError."""
    with open(path, "rb") as f:
        data = f.read()
    return decode_rgb(path, data)


def decode_rgb(name, data: bytes) -> Image.Image:
    """The whole image of `data` as RGB, decoded now; errors call it `name`."""
    return _decode(name, data, lambda image: image.convert("RGB"))


def checked_size(path, data: bytes) -> tuple[int, int]:
    """(height, width) from the header of `data`, which must pass check_jpeg too."""
    return _decode(path, data, lambda image: (image.height, image.width))


def _decode(path, data: bytes, use):
    check_jpeg(path, data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return use(image)
    except UnidentifiedImageError as err:  # its message names the in-memory copy
        raise CorruptImageError(path, "not an image format PIL knows") from err
    except Exception as err:  # PIL raises many types; the caller needs the file's name
        raise CorruptImageError(path, err) from err


def first_bad(index, samples) -> CorruptImageError | None:
    """The error of the first of `samples` (positions in `index`, an ImageFolderIndex or a
    ShardIndex) that does not decode, None if all do."""
    for i in samples:
        try:
            decode_rgb(index.name(i), index.read(i))
        except CorruptImageError as err:
            return err
    return None
