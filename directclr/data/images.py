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
libjpeg cannot see every damage (zeroed bytes can decode as valid codes): what it cannot see,
neither backend reports.
"""
from __future__ import annotations

import io

import simplejpeg
from PIL import Image, UnidentifiedImageError

JPEG_START = b"\xff\xd8"


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
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1, min_width=1)
    except ValueError as err:
        # Padding between the last scan and the end marker (0xd9) comes after every block is
        # decoded, so nothing is lost; cameras and editors write such files (ImageNet's train
        # set is known to hold some), so refusing them would stop real runs for nothing.
        if "extraneous bytes before marker 0xd9" not in str(err):
            raise CorruptImageError(path, err) from err


def load_rgb(path) -> Image.Image:
    """The whole image as RGB, decoded now; a file that cannot be read raises OSError."""
    with open(path, "rb") as f:
        data = f.read()
    return _decode(path, data, lambda image: image.convert("RGB"))


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


def first_bad(paths) -> CorruptImageError | None:
    """The error of the first file in `paths` that does not decode, None if all do."""
    for path in paths:
        try:
            load_rgb(path)
        except CorruptImageError as err:
            return err
    return None
