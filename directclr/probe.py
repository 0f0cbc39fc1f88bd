"""Linear probe of a pretrained backbone, the recipe's protocol: frozen backbone in eval mode, a
linear layer initialized N(0, 0.01), SGD (momentum 0.9, lr 0.1, weight decay 1e-6), batch 256,
cosine schedule; train with RandomResizedCrop + flip, validate on Resize + CenterCrop; the best
validation top-1 is the result. ``--subvector`` probes only r[:, :d0]. The head's training
(``train_linear_head``) is shared with the reproduction's probe on features computed once
(``directclr.reproduce.evaluation.feature_probe``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets
from torchvision import transforms as T

from .data.recipe import IMAGENET_MEAN, IMAGENET_STD
from .data.workers import worker_args
from .files import atomic_write, load_verified
from .models import build_backbone, read_description, stem_for


def load_backbone(checkpoint, arch: str | None = None) -> tuple[nn.Module, dict]:
    """A frozen backbone from backbone.pt or a training checkpoint, and what it is: arch, stem,
    width, and where recorded, image_size, mode and dim. Both kinds of file describe themselves;
    `arch` is needed only for a backbone.pt written before they did, and must agree otherwise."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"--checkpoint {path}: no such file")
    state = load_verified(path)
    if not isinstance(state, dict):
        raise ValueError(f"--checkpoint {path} holds a {type(state).__name__}, not a state dict")
    if "model" in state:  # a training checkpoint: keep the backbone's entries
        config, run = state.get("config", {}), state.get("run", {})
        image_size = run.get("image_size", config.get("image_size"))
        description = {key: config.get(key) for key in ("arch", "mode", "dim")}
        description["image_size"] = image_size
        state = {k[len("backbone."):]: v for k, v in state["model"].items()
                 if k.startswith("backbone.")}
    else:
        description = read_description(state)
    recorded = description.get("arch")
    if arch is not None and recorded not in (None, arch):
        raise ValueError(f"--arch {arch}, but {path} holds a {recorded} backbone (drop --arch)")
    arch = arch or recorded
    if arch is None:
        raise ValueError(f"{path} does not say which backbone it holds (written before "
                         "checkpoints described themselves): pass --arch")
    size = description.get("image_size")
    description["stem"] = description.get("stem") or (stem_for(size, arch) if size else
                                                       _stem_of(state))
    backbone, width = build_backbone(arch, description["stem"] == "cifar",
                                     default_image_size(description))
    try:
        backbone.load_state_dict(state)
    except RuntimeError as err:
        reason = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise ValueError(f"{path} does not fit a {arch} backbone ({reason})") from None
    return backbone.eval().requires_grad_(False), {**description, "arch": arch, "width": width}


def default_image_size(description: dict) -> int:
    """The size the backbone was trained at; for an old backbone.pt, its stem's usual size."""
    return description.get("image_size") or (32 if description["stem"] == "cifar" else 224)


def _stem_of(state: dict) -> str:
    """The first convolution's kernel tells the stems apart: 3x3 (cifar) or 7x7 (imagenet)."""
    first_conv = next((v for v in state.values() if torch.is_tensor(v) and v.dim() == 4), None)
    return "cifar" if first_conv is not None and first_conv.shape[-1] == 3 else "imagenet"


def probe_transforms(image_size: int):
    """The probe's (train, validation) transforms: RandomResizedCrop + flip, and Resize +
    CenterCrop, both normalized with ImageNet's mean and std."""
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose([T.RandomResizedCrop(image_size, interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomHorizontalFlip(), *normalize])
    resize = int(round(image_size * 256 / 224))
    val = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
                     T.CenterCrop(image_size), *normalize])
    return train, val


def load_split(root: Path, transform, limit: int | None, seed: int):
    """An ImageFolder split and its number of classes: all of it, or a seeded random subset of
    `limit` images (folders are sorted by class, so a prefix would be one class)."""
    folder = datasets.ImageFolder(root, transform=transform)
    if limit is not None and limit < len(folder):
        keep = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed))[:limit]
        return Subset(folder, keep.tolist()), len(folder.classes)
    return folder, len(folder.classes)


@torch.no_grad()
def _features(backbone, images, dim):
    rep = backbone(images)
    return rep[:, :dim] if dim is not None else rep


class FeatureBatches:
    """Features computed once, served as (features, labels) batches: each pass in a new random
    order drawn from `generator`; without one, in order."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 generator: torch.Generator | None = None):
        self.features, self.labels = features, labels
        self.batch_size, self.generator = batch_size, generator

    def __len__(self) -> int:
        return math.ceil(len(self.features) / self.batch_size)

    def __iter__(self):
        count = len(self.features)
        order = (torch.arange(count) if self.generator is None
                 else torch.randperm(count, generator=self.generator))
        for start in range(0, count, self.batch_size):
            rows = order[start:start + self.batch_size]
            yield self.features[rows], self.labels[rows]


class EmbeddedBatches:
    """Images embedded by a frozen backbone batch by batch, r or r[:, :dim]: each pass draws the
    loader's order and augmentations afresh."""

    def __init__(self, loader: DataLoader, backbone: nn.Module, dim: int | None = None,
                 device: str = "cpu"):
        self.loader, self.backbone, self.dim, self.device = loader, backbone, dim, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield (_features(self.backbone, images.to(self.device), self.dim),
                   labels.to(self.device))


def train_linear_head(train, val, in_dim: int, classes: int, *, epochs: int, lr: float = 0.1,
                      weight_decay: float = 1e-6, generator: torch.Generator | None = None,
                      device: str = "cpu", progress: bool = False) -> list[float]:
    """The linear probe's head, the recipe's protocol: a linear layer initialized N(0, 0.01)
    (from `generator`; None: torch's global RNG), SGD (momentum 0.9), a cosine schedule over
    every step, one pass over `train` an epoch; returns the validation top-1 (correct / total
    over `val`) after each epoch. `train` and `val` are sized iterables of (features, labels)
    batches: FeatureBatches (features computed once) or EmbeddedBatches (images embedded each
    epoch, with the loader's augmentation)."""
    head = nn.Linear(in_dim, classes).to(device)
    nn.init.normal_(head.weight, std=0.01, generator=generator)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9,
                                weight_decay=weight_decay)
    steps = epochs * len(train)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
    from tqdm import tqdm
    history = []
    for _ in tqdm(range(epochs), desc="probe", disable=not progress):
        for features, labels in train:
            loss = F.cross_entropy(head(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        correct = total = 0
        with torch.no_grad():
            for features, labels in val:
                correct += (head(features).argmax(1) == labels).sum().item()
                total += len(labels)
        history.append(correct / total)
    return history


def linear_probe(checkpoint, data, *, arch: str | None = None, epochs: int = 100,
                 batch_size: int = 256, lr: float = 0.1, weight_decay: float = 1e-6,
                 subvector: int | None = None, image_size: int | None = None,
                 num_workers: int = 0, limit: int | None = None, seed: int = 0,
                 device: str = "cpu", progress: bool = True, out=None) -> dict:
    """Trains the probe on data/train, evaluates on data/val each epoch; writes the result as
    JSON to `out` (default: probe-<checkpoint name>[-d<subvector>].json beside the checkpoint,
    so probes of different checkpoints in one folder keep their own) and returns it, with the
    file's path as "path"."""
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    data = Path(data)
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise ValueError(f"--data {data} needs {split}/ (ImageFolder trees train/ and val/)")
    torch.manual_seed(seed)
    backbone, description = load_backbone(checkpoint, arch)
    arch, width = description["arch"], description["width"]
    image_size = image_size or default_image_size(description)
    if subvector is not None and not 1 <= subvector <= width:
        raise ValueError(f"--subvector {subvector} must be in [1, {width}]")
    backbone = backbone.to(device)
    train_tf, val_tf = probe_transforms(image_size)
    train_set, classes = load_split(data / "train", train_tf, limit, seed)
    val_set, _ = load_split(data / "val", val_tf, limit, seed)
    loader_args = dict(batch_size=batch_size, **worker_args(num_workers))
    train_loader = DataLoader(train_set, shuffle=True, drop_last=False, **loader_args)
    val_loader = DataLoader(val_set, shuffle=False, **loader_args)
    history = train_linear_head(  # the global RNG, seeded above: the loader's order, the head
        EmbeddedBatches(train_loader, backbone, subvector, device),
        EmbeddedBatches(val_loader, backbone, subvector, device), subvector or width, classes,
        epochs=epochs, lr=lr, weight_decay=weight_decay, device=device, progress=progress)
    result = {"checkpoint": str(checkpoint), "arch": arch, "image_size": image_size,
              "subvector": subvector,
              "epochs": epochs, "top1_best": max(history), "top1_last": history[-1],
              "top1_per_epoch": history, "train_images": len(train_set),
              "val_images": len(val_set)}
    if out is None:
        suffix = f"-d{subvector}" if subvector else ""
        out = Path(checkpoint).with_name(f"probe-{Path(checkpoint).stem}{suffix}.json")
    out = Path(out)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    return {**result, "path": str(out)}
