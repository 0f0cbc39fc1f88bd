"""Linear probe of a pretrained backbone, the recipe's protocol: frozen backbone in eval mode, a
linear layer initialized N(0, 0.01), SGD (momentum 0.9, lr 0.1, weight decay 1e-6), batch 256,
cosine schedule; train with RandomResizedCrop + flip, validate on Resize + CenterCrop; the best
validation top-1 is the result. ``--subvector`` probes only r[:, :d0].
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
from .models import build_backbone


def load_backbone(checkpoint, arch: str, small_images: bool) -> tuple[nn.Module, int]:
    """A backbone from backbone.pt (plain state dict) or a training checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "model" in state:  # a training checkpoint: keep the backbone's entries
        state = {k[len("backbone."):]: v for k, v in state["model"].items()
                 if k.startswith("backbone.")}
    backbone, width = build_backbone(arch, small_images)
    backbone.load_state_dict(state)
    return backbone.eval().requires_grad_(False), width


def _transforms(image_size: int):
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose([T.RandomResizedCrop(image_size, interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomHorizontalFlip(), *normalize])
    resize = int(round(image_size * 256 / 224))
    val = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
                     T.CenterCrop(image_size), *normalize])
    return train, val


def _split(root: Path, transform, limit: int | None, seed: int):
    folder = datasets.ImageFolder(root, transform=transform)
    if limit is not None and limit < len(folder):
        keep = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed))[:limit]
        return Subset(folder, keep.tolist()), len(folder.classes)
    return folder, len(folder.classes)


@torch.no_grad()
def _features(backbone, images, dim):
    rep = backbone(images)
    return rep[:, :dim] if dim is not None else rep


def linear_probe(checkpoint, data, *, arch: str = "resnet50", epochs: int = 100,
                 batch_size: int = 256, lr: float = 0.1, weight_decay: float = 1e-6,
                 subvector: int | None = None, image_size: int | None = None,
                 num_workers: int = 0, limit: int | None = None, seed: int = 0,
                 device: str = "cpu", progress: bool = True) -> dict:
    """Trains the probe on data/train, evaluates on data/val each epoch; returns the result."""
    data = Path(data)
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise ValueError(f"--data {data} needs {split}/ (ImageFolder trees train/ and val/)")
    image_size = image_size or (32 if "fashion" in data.name else 224)
    small = image_size <= 64
    torch.manual_seed(seed)
    backbone, width = load_backbone(checkpoint, arch, small)
    if subvector is not None and not 1 <= subvector <= width:
        raise ValueError(f"--subvector {subvector} must be in [1, {width}]")
    backbone = backbone.to(device)
    train_tf, val_tf = _transforms(image_size)
    train_set, classes = _split(data / "train", train_tf, limit, seed)
    val_set, _ = _split(data / "val", val_tf, limit, seed)
    loader_args = dict(batch_size=batch_size, **worker_args(num_workers))
    train_loader = DataLoader(train_set, shuffle=True, drop_last=False, **loader_args)
    val_loader = DataLoader(val_set, shuffle=False, **loader_args)
    head = nn.Linear(subvector or width, classes).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9,
                                weight_decay=weight_decay)
    steps = epochs * len(train_loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
    from tqdm import tqdm
    history = []
    for epoch in tqdm(range(epochs), desc="probe", disable=not progress):
        head.train()
        for images, labels in train_loader:
            logits = head(_features(backbone, images.to(device), subvector))
            loss = F.cross_entropy(logits, labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        head.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in val_loader:
                logits = head(_features(backbone, images.to(device), subvector))
                correct += (logits.argmax(1).cpu() == labels).sum().item()
                total += len(labels)
        history.append(correct / total)
    result = {"checkpoint": str(checkpoint), "arch": arch, "subvector": subvector,
              "epochs": epochs, "top1_best": max(history), "top1_last": history[-1],
              "top1_per_epoch": history, "train_images": len(train_set),
              "val_images": len(val_set)}
    out = Path(checkpoint).with_name("probe_subvector.json" if subvector else "probe.json")
    out.write_text(json.dumps(result, indent=1))
    return result
