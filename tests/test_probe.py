"""The linear probe command on tiny data: both checkpoint formats, subvector, bad data."""
import json

import pytest
import torch

from directclr.data import prepare_synthetic
from directclr.models import build_backbone
from directclr.probe import linear_probe, load_backbone


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
    assert json.loads((tmp_path / "probe.json").read_text()) == result
    sub = linear_probe(tmp_path / "backbone.pt", splits, arch="resnet18", epochs=1,
                       batch_size=8, image_size=32, subvector=90, progress=False)
    assert sub["subvector"] == 90 and (tmp_path / "probe_subvector.json").exists()


def test_training_checkpoints_load_too(tmp_path):
    backbone, _ = build_backbone("resnet18", small_images=True)
    model_state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    model_state["probe.weight"] = torch.zeros(3, 512)
    torch.save({"model": model_state, "step": 3}, tmp_path / "ckpt.pt")
    loaded, width = load_backbone(tmp_path / "ckpt.pt", "resnet18", small_images=True)
    assert width == 512 and not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in backbone.state_dict().items())


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
