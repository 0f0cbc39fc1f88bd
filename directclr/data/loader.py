"""The pretraining loader: epochs of (view1, view2, labels) batches, sharded, resumable.

Every backend draws its samples from the same ``epoch_order`` (seeded shuffle per epoch, equal
shards per rank), so resuming, sharding and labels behave identically; the backends differ only
in who decodes and augments. Their samples come from an index, of an ImageFolder tree's files
(folder.py) or of WebDataset shards' samples (shards.py), the same for both. The torchvision
backend seeds each sample's augmentations from (seed, epoch, index), so a batch is the same
whichever worker made it and whether or not the run was resumed.
"""
from __future__ import annotations

import os

import torch

from ..config import LOADERS
from .folder import ImageFolderIndex, epoch_order
from .recipe import get_recipe
from .shards import ShardIndex, is_shard_data


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class PretrainLoader:
    """Iterating gives one epoch of batches; ``len()`` is the batches per epoch (per rank)."""

    def __init__(self, index: ImageFolderIndex | ShardIndex, batch_size: int, source, *,
                 seed: int, rank: int, world_size: int, device: torch.device):
        self.index, self.batch_size, self.source = index, batch_size, source
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        self.epoch = 0
        self.batches_done = 0  # of the current epoch, as handed to the caller

    def __len__(self) -> int:
        shard = -(-len(self.index) // self.world_size)
        return shard // self.batch_size

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for `epoch`, whole batches only."""
        indices = epoch_order(len(self.index), self.seed, epoch, self.rank, self.world_size)
        return indices[:len(self) * self.batch_size]

    def __iter__(self):
        for view1, view2, labels in self.source.batches(self, self.epoch, self.batches_done):
            self.batches_done += 1
            non_blocking = self.device.type == "cuda"
            yield (view1.to(self.device, non_blocking=non_blocking),
                   view2.to(self.device, non_blocking=non_blocking),
                   labels.to(self.device, non_blocking=non_blocking))
        self.epoch += 1
        self.batches_done = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed,
                "num_samples": len(self.index), "batch_size": self.batch_size,
                "world_size": self.world_size, "batches_per_epoch": len(self)}

    def load_state_dict(self, state: dict) -> None:
        """Resumes after the last batch handed out. The world size may differ from the saved
        one when the global batch and the batches per epoch do not: global batch b is always
        positions [b G, (b+1) G) of the epoch's order (epoch_order deals ranks round-robin), so
        a run can resume on fewer or more devices without repeating or skipping samples."""
        saved = {"seed": state["seed"], "num_samples": state["num_samples"],
                 "global batch size": state["batch_size"] * state["world_size"],
                 # The padding of the last shard can differ with the world size (10 samples in
                 # batches of 4: 2 on one rank, 3 on four ranks of 1).
                 "batches per epoch": state.get("batches_per_epoch", len(self))}
        mine = {"seed": self.seed, "num_samples": len(self.index),
                "global batch size": self.batch_size * self.world_size,
                "batches per epoch": len(self)}
        for key, value in saved.items():
            if value != mine[key]:
                raise ValueError(f"loader state has {key} {value}, this loader {mine[key]}: "
                                 "resuming would repeat or skip samples")
        if not 0 <= state["batches_done"] <= len(self):
            raise ValueError(f"loader state has batches_done={state['batches_done']} outside "
                             f"[0, {len(self)}]")
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]


def build_pretrain_loader(root, batch_size: int, *, backend: str = "auto", device="cuda",
                          image_size: int = 224, num_threads: int | None = None, seed: int = 0,
                          rank: int = 0, world_size: int = 1, recipe: str = "directclr",
                          index_cache=None) -> PretrainLoader:
    """Two augmented views of every image of `root`, ``batch_size`` per rank: an ImageFolder
    tree, or WebDataset shards (a .tar path or brace pattern, or a directory of .tar files;
    shards.py).

    backend: "dali" (GPU decode/augment on CUDA, DALI's CPU operators otherwise),
    "torchvision" (DataLoader workers) or "auto" (DALI when it imports). index_cache: where the
    shards' indexes go when their folder cannot be written.
    """
    if backend not in LOADERS:
        raise ValueError(f"backend must be one of {LOADERS}, got {backend!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available; pass device='cpu'")
    recipe_params = get_recipe(recipe)
    index = ShardIndex(root, index_cache) if is_shard_data(root) else ImageFolderIndex(root)
    if num_threads is None:  # 0 decodes in the calling process (torchvision backend)
        num_threads = max(1, min(8, os.cpu_count() or 1))
    loader_args = dict(seed=seed, rank=rank, world_size=world_size, device=device)
    if len(index) < world_size * batch_size:
        raise ValueError(f"{root} has {len(index)} images: fewer than one batch of {batch_size} "
                         f"per rank on {world_size} ranks")
    if backend == "auto":
        backend = "dali" if dali_available() else "torchvision"
    if backend == "dali":
        from .dali import DaliSource
        source = DaliSource(index, recipe_params, image_size, num_threads, seed, device)
    else:
        from .torchvision_source import TorchvisionSource
        source = TorchvisionSource(index, recipe_params, image_size, num_threads, seed,
                                   pin_memory=device.type == "cuda")
    return PretrainLoader(index, batch_size, source, **loader_args)
