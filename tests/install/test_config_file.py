"""--config FILE: a command's flags from TOML or YAML, the command line overriding them, and the
run's own <out>/config.toml that repeats it."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from directclr.cli import build_parser, main
from directclr.config import config_from_args
from tests.helpers import ENV_ONE_THREAD, RUN

TOML = """data = "{data}"
out = "{out}"
arch = "resnet18-w16"
dim = 22
batch-size = 8
epochs = 2
lr = 0.3
warmup_epochs = 0.5
image-size = 32
num-threads = 0
loader = "torchvision"
max-steps = 2
tensorboard = false
accept-changes = ["lr", "epochs"]
"""
YAML = """data: {data}
out: {out}
arch: resnet18-w16
dim: 22
batch-size: 8
epochs: 2
lr: 0.3
warmup_epochs: 0.5
image-size: 32
num-threads: 0
loader: torchvision
max-steps: 2
tensorboard: false
accept-changes: [lr, epochs]
"""
FLAGS = ["--arch", "resnet18-w16", "--dim", "22", "--batch-size", "8", "--epochs", "2",
         "--lr", "0.3", "--warmup-epochs", "0.5", "--image-size", "32", "--num-threads", "0",
         "--loader", "torchvision", "--max-steps", "2", "--accept-changes", "lr", "epochs"]


def config_of(argv):
    return config_from_args(build_parser().parse_args(argv))


@pytest.mark.parametrize("suffix, text", [(".toml", TOML), (".yaml", YAML)])
def test_a_file_sets_the_flags_and_the_command_line_overrides_it(tiny, tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text.format(data=tiny, out=tmp_path / "out"))
    flags = ["pretrain", "--data", str(tiny), "--out", str(tmp_path / "out"), *FLAGS]
    assert config_of(["pretrain", "--config", str(path)]) == config_of(flags)
    overridden = config_of(["pretrain", "--config", str(path), "--lr", "0.5", "--no-resume"])
    assert (overridden.lr, overridden.resume, overridden.dim) == (0.5, False, 22)


@pytest.mark.parametrize("text, message", [
    ('learning-rate = 0.1\n', "unknown key 'learning-rate'"),
    ('lr = -1\n', "lr = -1: must be finite and > 0, got -1"),
    ('arch = "resnet99"\n', "arch = 'resnet99': must be one of"),
    ('tensorboard = "yes"\n', "tensorboard = 'yes': must be true or false"),
    ('accept-changes = "lr"\n', "accept-changes = 'lr': must be a list"),
    ('variant = "nt"\n', "variant = 'nt': must be one of"),
    ('lr = 0.1\nlr = 0.2\n', "not TOML"),
    ('config = "other.toml"\n', "unknown key 'config'"),
])
def test_a_bad_key_or_value_is_one_line_naming_the_file_and_key(tmp_path, capsys, text,
                                                                message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["pretrain", "--config", str(path), "--data", str(tmp_path),
                                   "--out", str(tmp_path / "out")])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--config {path}" in err and message in err, err


def test_yaml_builds_no_python_objects(tmp_path, capsys):
    """yaml.safe_load: a tag that would run a command under yaml.load is an error."""
    marker = tmp_path / "ran"
    path = tmp_path / "run.yaml"
    path.write_text(f'lr: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--config", str(path)])
    assert "not YAML" in capsys.readouterr().err and not marker.exists()


def test_probe_and_spectrum_take_a_file_too(tmp_path):
    (tmp_path / "backbone.pt").write_bytes(b"")
    path = tmp_path / "spectrum.toml"
    path.write_text(f'checkpoint = "{tmp_path / "backbone.pt"}"\ndata = "{tmp_path}"\n'
                    f'out = "{tmp_path / "s"}"\nlimit = 64\n')
    args = build_parser().parse_args(["spectrum", "--config", str(path), "--limit", "32"])
    assert (args.checkpoint, args.limit) == (str(tmp_path / "backbone.pt"), 32)


def step_rows(out):
    """metrics.jsonl's step rows without what depends on the clock."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key not in ("pairs_per_s", "data_wait")}
            for row in rows if "loss" in row]


def test_a_run_from_a_file_equals_the_run_from_flags_and_repeats_from_its_folder(tiny,
                                                                                  tmp_path):
    by_flags, by_file = tmp_path / "flags", tmp_path / "file"
    path = tmp_path / "run.toml"
    path.write_text(TOML.format(data=tiny, out=by_file))
    assert main(["pretrain", *RUN[4:], "--data", str(tiny), "--out", str(by_flags), "--arch",
                 "resnet18-w16", "--dim", "22", "--max-steps", "2"]) == 0
    assert main(["pretrain", "--config", str(path), "--ckpt-every", "1"]) == 0
    assert step_rows(by_file) == step_rows(by_flags) and len(step_rows(by_flags)) == 2
    # The folder's config.toml repeats the run: here it finds it complete, in another process.
    written = by_file / "config.toml"
    from_file = config_of(["pretrain", "--config", str(path), "--ckpt-every", "1"])
    assert config_of(["pretrain", "--config", str(written)]) == replace(
        from_file, accept_changes=(), cache=str(Path(from_file.cache).expanduser()))
    again = subprocess.run([sys.executable, "-m", "directclr", "pretrain", "--config",
                            str(written)], capture_output=True, text=True, env=ENV_ONE_THREAD,
                           timeout=300)
    assert again.returncode == 0 and "already complete" in again.stderr, again.stderr[-2000:]
