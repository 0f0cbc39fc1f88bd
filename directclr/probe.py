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
from .files import atomic_write, load_verified
from .models import backbone_description, build_backbone


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
        description = backbone_description(state)
    recorded = description.get("arch")
    if arch is not None and recorded not in (None, arch):
        raise ValueError(f"--arch {arch}, but {path} holds a {recorded} backbone (drop --arch)")
    arch = arch or recorded
    if arch is None:
        raise ValueError(f"{path} does not say which backbone it holds (written before "
                         "checkpoints described themselves): pass --arch")
    description["stem"] = _stem_of(state)
    backbone, width = build_backbone(arch, description["stem"] == "cifar")
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
