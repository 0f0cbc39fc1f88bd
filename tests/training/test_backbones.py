"""Backbones by name: --arch torchvision:NAME and timm:NAME, their heads removed and their
representation width found, trained end to end and read back by probe and spectrum."""
import json

import pytest
import torch
from torch import nn

from directclr.config import Config, arch_problem
from directclr.models import backbone_width, build_backbone, read_description
from directclr.train import check_config
from tests.helpers import RUN

# (arch, image size, representation width as the model's documentation gives it)
BACKBONES = [("torchvision:vit_b_16", 32, 768),  # built for 32 px: 4 patches of 16
             ("torchvision:convnext_tiny", 32, 768),
             ("torchvision:efficientnet_b0", 32, 1280),  # dropout before its classifier
             ("torchvision:resnet18", 32, 512),  # the CIFAR stem applies
             ("timm:vit_tiny_patch16_224", 32, 192),
             ("timm:resnet18", 64, 512),
             ("torchvision:googlenet", 64, 1024)]  # dropout beside a top-level fc


@pytest.mark.parametrize("arch, size, width", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_a_named_backbone_returns_its_representation(arch, size, width):
    torch.manual_seed(0)
    model, found = build_backbone(arch, arch == "torchvision:resnet18", size)
    assert found == width == backbone_width(arch, size)
    features = model.train()(torch.randn(3, 3, size, size))
    assert features.shape == (3, width)
    assert not [name for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and module.out_features == 1000], "head kept"
    if arch == "torchvision:efficientnet_b0":  # its dropout would drop representation features
        assert all(isinstance(module, nn.Identity) for module in model.classifier)
    if arch == "torchvision:googlenet":
        assert isinstance(model.dropout, nn.Identity) and isinstance(model.fc, nn.Identity)


def test_the_cifar_stem_applies_to_resnets_only():
    resnet, _ = build_backbone("torchvision:resnet18", True, 32)
    assert resnet.conv1.kernel_size == (3, 3) and isinstance(resnet.maxpool, nn.Identity)
    vit, _ = build_backbone("torchvision:vit_b_16", True, 32)
    assert vit.conv_proj.kernel_size == (16, 16)


@pytest.mark.parametrize("arch, message", [
    ("resnet99", "--arch must be one of"),
    ("torchvision:", "--arch must be one of"),
    ("keras:resnet50", "--arch must be one of"),
    ("torchvision:resnet99", "--arch torchvision:resnet99: not a torchvision classification"),
    ("timm:not_a_model", "--arch timm:not_a_model: not a timm model"),
    ("torchvision:fcn_resnet50", "not a torchvision classification model"),  # segmentation
])
def test_an_unknown_backbone_is_one_error_naming_the_flag(arch, message):
    cfg = Config(data="", out="", arch=arch)
    with pytest.raises(ValueError, match=message):
        check_config(cfg, world=1)


def test_a_size_the_model_cannot_take_and_a_dim_beyond_its_width_are_refused():
    with pytest.raises(ValueError, match=r"--arch torchvision:vit_b_16 does not take 40 px"):
        check_config(Config(data="", out="", arch="torchvision:vit_b_16", image_size=40), 1)
    with pytest.raises(ValueError, match=r"--dim 769 must be in \[1, 768\] \(the "
                                         r"representation width of torchvision:convnext_tiny"):
        check_config(Config(data="", out="", arch="torchvision:convnext_tiny", dim=769,
                            image_size=32), 1)
    assert check_config(Config(data="", out="", arch="torchvision:convnext_tiny",
                               image_size=32), 1) == 768
    assert arch_problem("torchvision:vit_b_16") is None and arch_problem("timm:x") is None


def test_a_timm_vit_trains_and_spectrum_reads_it_back(tiny, tmp_path):
    """Two steps of timm's ViT-Tiny built for 32 px (ViT-B/16 steps take ~20 s here); backbone.pt
    describes it, so spectrum rebuilds it for 32 px without --arch or --image-size."""
    from directclr.cli import main
    out = tmp_path / "run"
    args = RUN[4:] + ["--data", str(tiny), "--max-steps", "2", "--arch",
                      "timm:vit_tiny_patch16_224", "--out", str(out)]
    assert main(["pretrain", *args]) == 0
    description = read_description(torch.load(out / "backbone.pt", weights_only=True))
    assert description == {"arch": "timm:vit_tiny_patch16_224", "stem": "imagenet",
                           "image_size": 32, "mode": "directclr", "dim": 90, "width": 192}
    assert main(["spectrum", "--checkpoint", str(out / "backbone.pt"), "--data", str(tiny),
                 "--out", str(tmp_path / "spectrum"), "--limit", "16"]) == 0
    spectrum = json.loads((tmp_path / "spectrum" / "spectrum.json").read_text())
    assert spectrum["dim"] == 192
