"""Backbones and the projector of each mode of the paper's comparison."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchvision import models as tv_models
from torchvision.models.resnet import BasicBlock

from .collectives import sum_over_ranks
from .config import ARCHS, MODES, PAPER_SIMCLR_OUT

SMALL_IMAGE_MAX = 64  # pixels; up to this size a ResNet gets the CIFAR stem
RESNET_NAMES = ("resnet", "wide_resnet", "resnext")  # torchvision's ResNet family
NO_AUX_HEAD = ("inception_v3", "googlenet")  # built without their auxiliary classifiers
SIZED_MODELS = ("vit_",)  # torchvision models built for one image size (image_size=)
# backbone.pt stays a plain state dict (weights_only=True, torchvision's load_state_dict); what
# built it rides in its `_metadata[""]`, which torch.save keeps and load_state_dict ignores.
DESCRIPTION_KEY = "directclr"


def stem_for(image_size: int, arch: str = "resnet50") -> str:
    """"cifar" (3x3 stride-1 conv, no max-pool) for small images on a ResNet, else the model's
    own ("imagenet")."""
    return "cifar" if image_size <= SMALL_IMAGE_MAX and _is_resnet(arch) else "imagenet"


def _is_resnet(arch: str) -> bool:
    """Whether the CIFAR stem applies: our ResNets and torchvision's ResNet family."""
    name = arch.removeprefix("torchvision:")
    return arch in ARCHS or (arch.startswith("torchvision:") and name.startswith(RESNET_NAMES))


def attach_description(state: dict, **description) -> dict:
    """`state` (a state_dict) carrying `description` (arch, stem, image_size, mode, dim...)."""
    metadata = getattr(state, "_metadata", None)
    if metadata is None:
        raise TypeError("attach_description takes a module's state_dict()")
    metadata[""] = {**metadata.get("", {}), DESCRIPTION_KEY: dict(description)}
    return state


def read_description(state: dict) -> dict:
    """What attach_description stored in `state`; {} for a state dict without it."""
    return dict(getattr(state, "_metadata", {}).get("", {}).get(DESCRIPTION_KEY, {}))


def build_backbone(arch: str, small_images: bool = False,
                   image_size: int = 224) -> tuple[nn.Module, int]:
    """The backbone without its classifier and its representation width. Ours: a torchvision
    ResNet with zero-initialized residual branches (or a narrow ResNet-18), with a CIFAR stem
    (3x3 stride-1 conv, no max-pool) for small images. "torchvision:NAME": any torchvision
    classification model; "timm:NAME": any timm model (timm installed); both built for
    `image_size` where the model's size is a constructor argument (ViTs)."""
    if arch.startswith("resnet18-w") and arch in ARCHS:
        return NarrowResNet18(ARCHS[arch] // 8, small_images), ARCHS[arch]
    width = ARCHS.get(arch) or representation_width(arch, small_images, image_size)
    return _backbone(arch, small_images, image_size), width


def representation_width(arch: str, small_images: bool, image_size: int) -> int:
    """The width of what --arch returns for images of `image_size`, from a forward pass on the
    meta device (shapes only: no memory, no initialization); an error naming --arch where that
    is not one vector per image."""
    def refused(err: Exception) -> ValueError:
        return ValueError(f"--arch {arch} does not take {image_size} px images: "
                          f"{' '.join(str(err).split())[:200]}")
    try:
        try:
            with torch.device("meta"):
                model = _backbone(arch, small_images, image_size)
        except NotImplementedError:  # a constructor that reads a tensor it made (RegNet's)
            model = _backbone(arch, small_images, image_size).to("meta")
    except (RuntimeError, AssertionError) as err:  # a ViT's size check; ours are ValueErrors
        raise refused(err) from None
    try:
        with torch.no_grad():
            features = model.eval()(torch.empty(2, 3, image_size, image_size, device="meta"))
    except (RuntimeError, ValueError, AssertionError) as err:
        raise refused(err) from None
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
        raise ValueError(f"--arch {arch}: its features are {shape}, not one vector per image")
    return features.shape[1]


def backbone_width(arch: str, image_size: int) -> int:
    """The representation width of --arch at --image-size, for checks before any work."""
    return ARCHS.get(arch) or representation_width(arch, stem_for(image_size, arch) == "cifar",
                                                   image_size)


def _backbone(arch: str, small_images: bool, image_size: int) -> nn.Module:
    source, _, name = arch.partition(":")
    if arch in ARCHS:
        model = getattr(tv_models, arch)(weights=None, zero_init_residual=True)
    elif source == "torchvision":
        model = _torchvision_model(name, image_size)
    elif source == "timm":
        return _timm_model(name, image_size)  # num_classes=0: no classifier
    else:
        raise ValueError(f"--arch must be one of {sorted(ARCHS)}, torchvision:NAME or "
                         f"timm:NAME, got {arch!r}")
    if small_images and _is_resnet(arch):
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1,
                                bias=False)
        model.maxpool = nn.Identity()
    _remove_classifier(model)
    return model


def _torchvision_model(name: str, image_size: int) -> nn.Module:
    if name not in tv_models.list_models(module=tv_models):
        raise ValueError(f"--arch torchvision:{name}: not a torchvision classification model "
                         f"(torchvision.models.list_models(module=torchvision.models))")
    options = {"zero_init_residual": True} if name.startswith(RESNET_NAMES) else {}
    if name.startswith(NO_AUX_HEAD):  # their auxiliary classifiers change forward()'s output
        options.update(aux_logits=False, init_weights=True)
    builder = tv_models.get_model_builder(name)
    if name.startswith(SIZED_MODELS):  # their position embeddings are made for one size
        options["image_size"] = image_size
    return builder(weights=None, **options)


def _timm_model(name: str, image_size: int) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ValueError(f"--arch timm:{name} needs timm: pip install timm") from None
    if not timm.is_model(name):
        raise ValueError(f"--arch timm:{name}: not a timm model (timm.list_models())")
    options = {"pretrained": False, "num_classes": 0}  # num_classes=0: pooled features
    try:  # ViTs and other models made for one size take it; the others refuse the argument
        return timm.create_model(name, img_size=image_size, **options)
    except TypeError:
        return timm.create_model(name, **options)


def _remove_classifier(model: nn.Module) -> None:
    """The last nn.Linear (torchvision's fc, classifier[-1], heads.head...) becomes Identity,
    and so does dropout beside it: it would drop features of the representation."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to remove")
    head = linears[-1]
    container = head.rpartition(".")[0]
    dropouts = [name for name, module in model.named_modules()
                if isinstance(module, nn.Dropout) and name.rpartition(".")[0] == container]
    for name in [head, *dropouts]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())


class NarrowResNet18(nn.Module):
    """torchvision's ResNet-18 layout (BasicBlocks [2, 2, 2, 2], zero-initialized residual
    branches, no fc) with stage widths base x (1, 2, 4, 8); representation width 8 x base."""

    def __init__(self, base: int, small_images: bool):
        super().__init__()
        if small_images:  # CIFAR stem, as build_backbone does for 32 px data
            stem = [nn.Conv2d(3, base, 3, 1, 1, bias=False)]
        else:
            stem = [nn.Conv2d(3, base, 7, 2, 3, bias=False)]
        stem += [nn.BatchNorm2d(base), nn.ReLU(inplace=True)]
        if not small_images:
            stem.append(nn.MaxPool2d(3, 2, 1))
        stages, inplanes = [], base
        for index, stride in enumerate((1, 2, 2, 2)):
            planes = base * 2 ** index
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                           nn.BatchNorm2d(planes))
            stages.append(nn.Sequential(BasicBlock(inplanes, planes, stride, downsample),
                                        BasicBlock(planes, planes)))
            inplanes = planes
        self.features = nn.Sequential(*stem, *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def forward(self, x):
        return self.features(x)


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


def build_projector(mode: str, width: int, dim: int,
                    simclr_out: int = PAPER_SIMCLR_OUT) -> tuple[nn.Module, int | None]:
    """(projector, the loss's `dim`): DirectCLR has no projector and a subvector of `dim`. The
    SimCLR projectors are the official code's: the MLP is Linear(w, w) + BN + ReLU +
    Linear(w, out) + BN(out), the linear one Linear(w, out), all without biases."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "directclr":
        return nn.Identity(), dim
    if mode == "simclr-mlp":
        return nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width),
                             nn.ReLU(inplace=True), nn.Linear(width, simclr_out, bias=False),
                             nn.BatchNorm1d(simclr_out)), None
    if mode == "simclr-linear":
        return nn.Linear(width, simclr_out, bias=False), None
    if mode == "simclr-none":
        return nn.Identity(), None
    if mode == "fixed-lowrank":
        return FixedLowRank(width, dim), None
    return Diagonal(width), None


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all ranks, for CPU process groups (gloo), where
    torch's SyncBatchNorm does not run. The per-channel sums (with the sample count), then the
    squared deviations from the global mean, are summed over ranks with autograd-aware
    all-reduces, so forward and backward equal one process holding every rank's samples (the
    recipe's SyncBN semantics)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        reduce_dims = [0] + list(range(2, x.dim()))
        count = x.new_tensor([x.numel() // x.shape[1]])
        sums = sum_over_ranks(torch.cat([x.sum(reduce_dims), count]))
        total = sums[-1].detach()
        if total <= 1:  # the same global count on every rank, so every rank raises
            raise ValueError("CpuSyncBatchNorm: expected more than 1 value per channel over all "
                             f"ranks when training, got {int(total)}")
        mean = sums[:-1] / total
        shape = [1, -1] + [1] * (x.dim() - 2)
        centered = x - mean.view(shape)
        var = sum_over_ranks(centered.square().sum(reduce_dims)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (self.momentum if self.momentum is not None
                          else 1.0 / float(self.num_batches_tracked))  # cumulative average
                unbiased = var * (total / (total - 1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `model` normalizes over the global batch: torch's SyncBatchNorm on
    GPUs, CpuSyncBatchNorm on CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            synced = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum,
                                      child.affine, child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced)
        else:
            sync_batchnorm(child, device)
    return model
