"""The command line as a user meets it: every default in --help, every bad value of every flag
one line naming the flag (exit 2, no traceback, nothing created), and argv built from Config."""
import argparse
import math
from pathlib import Path

import pytest

from directclr import cli, commands, plot, train
from directclr.config import Config, config_from_args, pretrain_argv


class Ran(Exception):
    """A command got past its argument checks."""


def subcommands() -> dict:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


COMMANDS = sorted(subcommands())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default_and_a_line_for_every_flag(command, capsys):
    parser = subcommands()[command]
    formatter = cli.HelpFormatter(parser.prog)
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, (command, action.dest)
        if action.option_strings:
            text = formatter._get_help_string(action)
            assert "(default" in text or "(required)" in text, (command, action.dest, text)
            assert "(default: None)" not in text, (command, action.dest)
    assert cli.main([command, "--help"]) == 0
    assert "usage: directclr " + command in capsys.readouterr().out


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    (tmp_path / "backbone.pt").write_bytes(b"")
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "run").mkdir()
    return tmp_path


def base_argv(command: str, p) -> list[str]:
    """Valid arguments of each command; --out (where there is one) does not exist yet."""
    out = str(p / "out")
    return {"prepare": ["synthetic", "--out", out],
            "pretrain": ["--data", str(p / "data" / "train"), "--out", out],
            "probe": ["--checkpoint", str(p / "backbone.pt"), "--data", str(p / "data")],
            "spectrum": ["--checkpoint", str(p / "backbone.pt"), "--data", str(p / "data"),
                         "--out", out],
            "theory": ["strong-aug", "--out", out],
            "reproduce": ["--out", out],
            "info": [],
            "plot": [str(p / "run")]}[command]


def bad_value(action, p) -> str:
    """A value each flag must refuse, chosen by what the flag takes."""
    if action.choices or getattr(action.type, "__name__", None) == "choice":
        return "bogus"
    kind = getattr(action.type, "__name__", None)
    return {"int": "-7", "float": "nan", "file": str(p / "missing.pt"),
            "dir": str(p / "missing"), "dataset": str(p / "missing"), "splits": str(p / "missing"),
            "existing": str(p / "missing"), "output_dir": str(p / "a_file"),
            "output_file": str(p / "run"), "device": "tpu9", "arch": "resnet99",
            "_accept": "num-threads"}[kind]


def cases():
    for command, parser in subcommands().items():
        for action in parser._actions:
            takes_value = action.nargs != 0 and action.dest != "help"
            if takes_value:
                yield command, action.dest


@pytest.fixture
def no_run(monkeypatch):
    """Every command's work replaced by Ran: a case that reaches it was not refused."""
    def ran(args):
        raise Ran(args.command)
    for name in ("_prepare", "_pretrain", "_info"):
        monkeypatch.setattr(cli, name, ran)
    for name in ("_probe", "_spectrum", "_theory", "_reproduce"):
        monkeypatch.setattr(commands, name, ran)
    monkeypatch.setattr(plot, "_plot", ran)


@pytest.mark.parametrize("command", COMMANDS)
def test_valid_arguments_reach_the_command(command, paths, no_run):
    with pytest.raises(Ran):
        cli.main([command, *base_argv(command, paths)])


@pytest.mark.parametrize("command,dest", sorted(cases()))
def test_every_bad_value_is_one_line_naming_the_flag(command, dest, paths, no_run, capsys):
    parser = subcommands()[command]
    (action,) = [a for a in parser._actions if a.dest == dest]
    argv = base_argv(command, paths)
    bad = bad_value(action, paths)
    if action.option_strings:
        argv += [action.option_strings[0], bad]
        named = action.option_strings[0]
    else:  # a positional: the first argument
        argv = [bad, *argv[1:]] if argv else [bad]
        named = bad
    code = cli.main([command, *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (command, dest, err)
    assert named in lines[0] and "Traceback" not in err, lines[0]
    assert not (paths / "out").exists()


def test_errors_read_as_flag_then_reason(paths, no_run, capsys):
    assert cli.main(["pretrain", *base_argv("pretrain", paths), "--lr", "0"]) == 2
    assert capsys.readouterr().err.startswith(
        "directclr pretrain: error: --lr must be finite and > 0, got 0.0 (see directclr "
        "pretrain --help)")
    assert cli.main(["probe", *base_argv("probe", paths), "--epochs", "0"]) == 2
    assert "--epochs must be an integer >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["pretrain", "--data", str(paths / "a_file"), "--out", "x"]) == 2
    assert "--data " + str(paths / "a_file") + " is a file" in capsys.readouterr().err


def test_pretrain_argv_round_trips_through_the_parser(paths):
    cfg = Config(data=str(paths / "data"), out=str(paths / "out"), arch="resnet18",
                 mode="simclr-mlp", dim=None, temperature=0.2, batch_size=64, max_steps=5,
                 wd=0.0, warmup_epochs=0.5, resume=False, compile=True,
                 accept_changes=("epochs", "max_steps"), image_size=32, num_threads=0)
    parser = subcommands()["pretrain"]
    assert config_from_args(parser.parse_args(pretrain_argv(**vars(cfg)))) == cfg
    with pytest.raises(ValueError, match="'batch' is not a setting"):
        pretrain_argv(batch=8)


def test_config_checks_name_the_flag():
    from directclr.config import check_fields
    for change, message in [({"lr": math.inf}, "--lr must be finite and > 0"),
                            ({"seed": 2 ** 32}, r"--seed must be below 2\*\*32"),
                            ({"accept_changes": ("cache",)}, "--accept-changes must be one of"),
                            ({"variant": "simclr"}, "--variant must be one of"),
                            ({"num_threads": 1.5}, "--num-threads must be an integer >= 0")]:
        with pytest.raises(ValueError, match=message):
            check_fields(Config(data="", out="", **change))


@pytest.mark.parametrize("as_path", [str, Path])
def test_config_path_checks_take_str_and_path(tmp_path, as_path):
    """A Config built in Python with pathlib paths is checked as one built from flags."""
    from directclr.config import check_fields
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="--data .*no such"):
        check_fields(Config(data=as_path(tmp_path / "missing"), out=as_path(tmp_path / "o")))
    with pytest.raises(ValueError, match="--out"):
        check_fields(Config(data=as_path(tmp_path), out=as_path(a_file)))


def test_dim_defaults_to_the_papers_fraction_of_the_width(tmp_path, monkeypatch, caplog):
    """--dim not given: 360/2048 of the backbone's width (22 of resnet18-w16's 128), said in
    the log and recorded in backbone.pt."""
    import logging

    import torch

    from directclr.models import read_description
    from tests.helpers import FixedBatches
    cfg = Config(data=str(tmp_path), out=str(tmp_path / "out"), arch="resnet18-w16",
                 batch_size=8, epochs=1, lr=0.3, image_size=32, loader="torchvision")
    monkeypatch.setattr(train, "build_pretrain_loader", lambda *a, **k: FixedBatches(2, 8))
    with caplog.at_level(logging.INFO, logger="directclr.train"):
        backbone = train.pretrain(cfg)
    assert "--dim not given: d0 = 22" in caplog.text
    assert read_description(torch.load(backbone, weights_only=True))["dim"] == 22
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="directclr.train"):
        train.pretrain(cfg)  # the finished run, again: says so and trains nothing
    assert "already complete: step 2 of 2" in caplog.text
