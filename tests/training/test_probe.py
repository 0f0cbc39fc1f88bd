"""The linear probe command on tiny data: both checkpoint formats, subvector, bad data."""
import json

import pytest
import torch

from directclr.data import prepare_synthetic
from directclr.models import attach_description, build_backbone, read_description, stem_for
from directclr.probe import default_image_size, linear_probe, load_backbone


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    for split, seed in (("train", 0), ("val", 1)):
        prepare_synthetic(root / split, n=24, classes=3, seed=seed, min_side=36, max_side=48,
                          progress=False)
    return root


def test_probe_runs_and_writes_its_result(splits, tmp_path):
    backbone, _ = build_backbone("resnet18", small_images=True)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pt")
    result = linear_probe(tmp_path / "backbone.pt", splits, arch="resnet18", epochs=2,
                          batch_size=8, image_size=32, progress=False)
    assert 0.0 <= result["top1_best"] <= 1.0 and len(result["top1_per_epoch"]) == 2
    assert result["top1_best"] == max(result["top1_per_epoch"])
    written = tmp_path / "probe-backbone.json"  # named after its checkpoint: others keep theirs
    assert result.pop("path") == str(written) and json.loads(written.read_text()) == result
    sub = linear_probe(tmp_path / "backbone.pt", splits, arch="resnet18", epochs=1,
                       batch_size=8, image_size=32, subvector=90, progress=False)
    assert sub["subvector"] == 90 and (tmp_path / "probe-backbone-d90.json").exists()


def test_training_checkpoints_load_too(tmp_path):
    backbone, _ = build_backbone("resnet18", small_images=True)
    model_state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    model_state["probe.weight"] = torch.zeros(3, 512)
    torch.save({"model": model_state, "step": 3}, tmp_path / "old.pt")
    loaded, described = load_backbone(tmp_path / "old.pt", "resnet18")
    assert described["width"] == 512 and described["stem"] == "cifar" and not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in backbone.state_dict().items())
    config = {"arch": "resnet18", "mode": "directclr", "dim": 90, "image_size": None}
    torch.save({"model": model_state, "step": 3, "config": config, "run": {"image_size": 32}},
               tmp_path / "ckpt.pt")
    _, described = load_backbone(tmp_path / "ckpt.pt")  # no arch: the config says it
    assert described == {"arch": "resnet18", "mode": "directclr", "dim": 90, "image_size": 32,
                         "stem": "cifar", "width": 512}


@pytest.mark.parametrize("arch, small", [("resnet18", False), ("resnet18-w16", True)])
def test_backbone_pt_describes_itself(tmp_path, arch, small):
    backbone, width = build_backbone(arch, small_images=small)
    size = 32 if small else 224
    state = attach_description(backbone.state_dict(), arch=arch, stem=stem_for(size),
                               image_size=size, mode="directclr", dim=8)
    torch.save(state, tmp_path / "backbone.pt")
    raw = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert read_description(raw)["arch"] == arch
    loaded, described = load_backbone(tmp_path / "backbone.pt")
    assert described["arch"] == arch and described["width"] == width
    assert described["stem"] == ("cifar" if small else "imagenet")
    assert default_image_size(described) == (32 if small else 224)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in backbone.state_dict().items())
    if arch == "resnet18":  # torchvision's own model takes it, description and all
        from torchvision.models import resnet18
        plain = resnet18()
        plain.fc = torch.nn.Identity()
        plain.load_state_dict(raw)
    with pytest.raises(ValueError, match="--arch resnet50, but .* holds a " + arch):
        load_backbone(tmp_path / "backbone.pt", "resnet50")


def test_backbone_without_description_needs_arch_and_must_fit(tmp_path):
    backbone, _ = build_backbone("resnet18-w16", small_images=True)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pt")
    with pytest.raises(ValueError, match="pass --arch"):
        load_backbone(tmp_path / "backbone.pt")
    with pytest.raises(ValueError, match="does not fit a resnet18 backbone"):
        load_backbone(tmp_path / "backbone.pt", "resnet18")
    with pytest.raises(ValueError, match="no such file"):
        load_backbone(tmp_path / "missing.pt")


def test_bad_data_and_subvector(splits, tmp_path):
    backbone, _ = build_backbone("resnet18", small_images=True)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pt")
    with pytest.raises(ValueError, match="val/"):
        linear_probe(tmp_path / "backbone.pt", splits / "train", arch="resnet18", epochs=1,
                     image_size=32, progress=False)
    with pytest.raises(ValueError, match="--subvector"):
        linear_probe(tmp_path / "backbone.pt", splits, arch="resnet18", epochs=1,
                     image_size=32, subvector=600, progress=False)


def test_spectrum_command_writes_json_and_plot(splits, tmp_path):
    from directclr.cli import main
    backbone, _ = build_backbone("resnet18", small_images=True)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pt")
    for extra, width in (([], 512), (["--subvector", "90"], 90)):
        out = tmp_path / f"spec{width}"
        assert main(["spectrum", "--checkpoint", str(tmp_path / "backbone.pt"), "--arch",
                     "resnet18", "--data", str(splits / "val"), "--image-size", "32", "--out",
                     str(out), *extra]) == 0
        report = json.loads((out / "spectrum.json").read_text())
        assert report["dim"] == width and len(report["eigenvalues"]) == width
        assert report["n"] == 24 and report["collapsed"] >= width - 23  # 24 rows: rank <= 23
        assert (out / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
