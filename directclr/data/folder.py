"""ImageFolder scanning and the epoch order, shared by every backend (the order by WebDataset
shards too, shards.py) so that labels, shards and resume points are the same whichever pipeline
decodes the images."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderIndex:
    """Sorted class folders (= torchvision ImageFolder labels) and their image files.

    Files without an image extension are skipped and counted in ``skipped`` (logged once); an
    empty root or a class folder without images is an error that names the folder.
    """

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root {self.root} is not a directory")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"data root {self.root} holds no class folders (expected "
                             f"root/<class>/<image>, or .tar shards)")
        self.files: list[str] = []
        self.labels: list[int] = []
        self.skipped: list[str] = []
        for label, name in enumerate(self.classes):
            found = 0
            for path in sorted((self.root / name).rglob("*")):
                if not path.is_file():
                    continue
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    self.files.append(str(path))
                    self.labels.append(label)
                    found += 1
                else:
                    self.skipped.append(str(path))
            if found == 0:
                raise ValueError(f"class folder {self.root / name} holds no images")
        if self.skipped:
            log.warning("skipped %d non-image files under %s (first: %s)", len(self.skipped),
                        self.root, self.skipped[0])

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        """What errors call sample i: its file."""
        return self.files[i]

    def read(self, i: int) -> bytes:
        """Sample i's encoded image."""
        with open(self.files[i], "rb") as f:
            return f.read()


def epoch_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's sample indices for one epoch: a seeded shuffle that differs every epoch,
    padded (by wrapping around) to a multiple of world_size so that every shard has the same
    size, then dealt round-robin."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen)
    padded = -(-n // world_size) * world_size
    if padded > n:
        order = torch.cat([order, order[:padded - n]])
    return order[rank::world_size]
