"""Datasets as ImageFolder trees, so small runs go through the same reader path as ImageNet."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_write

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist
# Folder names sort in label order, so ImageFolder's labels are Fashion-MNIST's.
FASHION_MNIST_CLASSES = ("0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
                         "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot")
FASHION_MNIST_SPLITS = {"train": "train", "val": "t10k"}


def _read_idx(path: Path, header_bytes: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header_bytes)


def prepare_fashion_mnist(out, source: Path = FASHION_MNIST_DIR, limit: int | None = None,
                          progress: bool = True, limit_val: bool = True) -> Path:
    """Writes out/{train,val}/<class>/<index>.png: 28x28 grayscale padded to 32x32, RGB; the
    first `limit` images of each split (of train only with limit_val=False).
    Fashion-MNIST is MIT-licensed (Zalando Research). Idempotent: a finished tree is kept."""
    out = Path(out)
    done = out / ".complete"
    if done.exists() and limit is None:
        return out
    if not source.is_dir():
        raise FileNotFoundError(f"{source} not found: install Debian's dataset-fashion-mnist "
                                "(apt-get install dataset-fashion-mnist)")
    for split, prefix in FASHION_MNIST_SPLITS.items():
        images = _read_idx(source / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", 8)
        if len(images) != len(labels):
            raise ValueError(f"{source}: {len(images)} {prefix} images but {len(labels)} labels")
        limited = limit is not None and (split == "train" or limit_val)
        count = min(limit, len(images)) if limited else len(images)
        for name in FASHION_MNIST_CLASSES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        padded = np.zeros((32, 32), dtype=np.uint8)
        for i in _progress(range(count), f"fashion-mnist {split}", progress):
            padded[2:30, 2:30] = images[i]
            target = out / split / FASHION_MNIST_CLASSES[labels[i]] / f"{i:05d}.png"
            _atomic_save(Image.fromarray(padded).convert("RGB"), target)
    if limit is None:
        done.touch()
    return out


def prepare_synthetic(out, n: int, classes: int = 4, seed: int = 0, min_side: int = 160,
                      max_side: int = 480, progress: bool = True) -> Path:
    """n colourful JPEGs of varied sizes in `classes` folders (for tests and benchmarks)."""
    if n < classes:
        raise ValueError(f"n must be >= classes ({classes}), got {n}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (out / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in _progress(range(n), "synthetic", progress):
        height, width = rng.integers(min_side, max_side + 1, size=2)
        # Smooth colour gradients plus noise: real-looking statistics, compressible as JPEG.
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        freq = rng.uniform(2, 12, size=3) / max(height, width)
        channels = [127 + 100 * np.sin(freq[k] * (xs + 0.7 * ys) * 2 * np.pi + phase[k])
                    for k in range(3)]
        pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        _atomic_save(image, out / f"class_{i % classes:03d}" / f"{i:06d}.jpg", quality=90)
    return out


def _atomic_save(image: Image.Image, target: Path, **kwargs) -> None:
    """A killed run never leaves a truncated image behind."""
    file_format = "JPEG" if target.suffix == ".jpg" else "PNG"
    atomic_write(target, lambda tmp: image.save(tmp, format=file_format, **kwargs))


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="img", mininterval=1.0)
