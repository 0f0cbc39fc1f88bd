"""Backbones and the projector of each mode of the paper's comparison."""
from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tv_models

ARCHS = {"resnet18": 512, "resnet50": 2048}  # representation width
MODES = ("directclr", "simclr-mlp", "simclr-linear", "simclr-none", "fixed-lowrank", "diagonal")
SIMCLR_OUT = 128  # SimCLR's projector output width


def build_backbone(arch: str, small_images: bool = False) -> tuple[nn.Module, int]:
    """torchvision ResNet with zero-initialized residual branches and no fc; for 32 px images a
    CIFAR stem (3x3 stride-1 conv, no max-pool) keeps the spatial resolution."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    model = getattr(tv_models, arch)(weights=None, zero_init_residual=True)
    if small_images:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model, ARCHS[arch]


class FixedLowRank(nn.Module):
    """A fixed (untrained) random projection of rank `rank`: the paper's fixed low-rank head."""

    def __init__(self, width: int, rank: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(width, rank, generator=gen))
        self.register_buffer("weight", basis @ basis.T)  # an orthogonal projector of rank `rank`

    def forward(self, r):
        return r @ self.weight.T


class Diagonal(nn.Module):
    """A trainable diagonal projector (the paper's Proposition 1)."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, r):
        return r * self.scale


def build_projector(mode: str, width: int, dim: int) -> tuple[nn.Module, int | None]:
    """(projector, the loss's `dim`): DirectCLR has no projector and a subvector of `dim`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "directclr":
        return nn.Identity(), dim
    if mode == "simclr-mlp":
        return nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width),
                             nn.ReLU(inplace=True), nn.Linear(width, SIMCLR_OUT)), None
    if mode == "simclr-linear":
        return nn.Linear(width, width), None
    if mode == "simclr-none":
        return nn.Identity(), None
    if mode == "fixed-lowrank":
        return FixedLowRank(width, dim), None
    return Diagonal(width), None
