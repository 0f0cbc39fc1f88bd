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
                                "(apt-get install dataset-fashion-mnist), or try the package "
                                "with `directclr prepare synthetic`")
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
        for i in with_progress(range(count), f"fashion-mnist {split}", progress):
            padded[2:30, 2:30] = images[i]
            target = out / split / FASHION_MNIST_CLASSES[labels[i]] / f"{i:05d}.png"
            _atomic_save(Image.fromarray(padded).convert("RGB"), target)
    if limit is None:
        done.touch()
    return out


# One pattern family per class, so that a probe has something to find; the orientation of each
# survives the recipe's crops and flips, and its colours and frequency vary per image.
PATTERNS = ("vertical stripes", "horizontal stripes", "rings", "checks")
VAL_SEED_OFFSET = 2 ** 32  # validation images come from another stream than any training seed


def _pattern(kind: int, xs: np.ndarray, ys: np.ndarray, freq: float, phase: float) -> np.ndarray:
    """A field in [-1, 1] of the class's family; classes beyond PATTERNS repeat them at a
    higher frequency band."""
    freq *= 1 + kind // len(PATTERNS)
    if PATTERNS[kind % len(PATTERNS)] == "vertical stripes":
        return np.sin(2 * np.pi * freq * xs + phase)
    if PATTERNS[kind % len(PATTERNS)] == "horizontal stripes":
        return np.sin(2 * np.pi * freq * ys + phase)
    if PATTERNS[kind % len(PATTERNS)] == "rings":
        radius = np.hypot(xs - xs.mean(), ys - ys.mean())
        return np.sin(2 * np.pi * freq * radius + phase)
    return np.sin(2 * np.pi * freq * xs + phase) * np.sin(2 * np.pi * freq * ys)


def prepare_synthetic(out, n: int, classes: int = 4, seed: int = 0, min_side: int = 160,
                      max_side: int = 480, progress: bool = True) -> Path:
    """n JPEGs of varied sizes in `classes` folders: image i is of class i % classes, a pattern
    of that class's family (PATTERNS) in random colours, with noise."""
    if n < classes:
        raise ValueError(f"n must be >= classes ({classes}), got {n}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (out / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in with_progress(range(n), "synthetic", progress):
        height, width = rng.integers(min_side, max_side + 1, size=2)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
        field = _pattern(i % classes, xs, ys, rng.uniform(2, 6), rng.uniform(0, 2 * np.pi))
        colour = rng.uniform(-100, 100, size=3)  # per channel: the pattern's contrast and sign
        pixels = 127 + field[..., None] * colour + rng.normal(0, 12, size=(height, width, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        _atomic_save(image, out / f"class_{i % classes:03d}" / f"{i:06d}.jpg", quality=90)
    return out


def prepare_synthetic_splits(out, train: int, val: int, classes: int = 4, seed: int = 0,
                             min_side: int = 160, max_side: int = 480,
                             progress: bool = True) -> Path:
    """out/train and out/val of prepare_synthetic, from independent draws: a quick start's
    dataset for pretrain, probe and spectrum."""
    if val < classes:
        raise ValueError(f"--val {val} must be at least --classes ({classes})")
    out = Path(out)
    sides = {"min_side": min_side, "max_side": max_side, "progress": progress}
    prepare_synthetic(out / "train", train, classes, seed, **sides)
    prepare_synthetic(out / "val", val, classes, seed + VAL_SEED_OFFSET, **sides)
    return out


def _atomic_save(image: Image.Image, target: Path, **kwargs) -> None:
    """A killed run never leaves a truncated image behind."""
    file_format = "JPEG" if target.suffix == ".jpg" else "PNG"
    atomic_write(target, lambda tmp: image.save(tmp, format=file_format, **kwargs))


def with_progress(items, desc: str, enabled: bool, unit: str = "img"):
    """`items`, counted in `unit`s on a progress bar where `enabled` and tqdm is installed."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, mininterval=1.0)
