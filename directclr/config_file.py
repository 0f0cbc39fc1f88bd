"""`--config FILE`: a command's flags from a TOML or YAML file, the command line overriding it.

    # runs/in1k.toml                      directclr pretrain --config runs/in1k.toml --lr 2.4
    data = "/imagenet/train"
    out = "runs/in1k"
    arch = "resnet50"
    batch-size = 4096                     # or batch_size: a flag's name, with - or _

Keys are the command's flags (without --), values their types: numbers, strings, true/false for
switches, lists for flags that take several values. Each value goes through its flag's own
check, so a bad one is the same one-line error as on the command line, naming the file and the
key. `directclr pretrain` writes the settings it resolved to <out>/config.toml, which this
reads back: `directclr pretrain --config runs/in1k/config.toml` repeats (resumes) that run.
YAML is read with yaml.safe_load (PyYAML, where installed), which builds no Python objects; TOML
with the standard library's tomllib (tomli on Python 3.10).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

CONFIG_FLAG = "--config"
WRITTEN_NAME = "config.toml"  # what pretrain writes into --out


def read_settings(path: Path) -> dict:
    """The file's top-level table; ValueError naming the file where it is not one."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{CONFIG_FLAG} {path}: cannot read it ({err})") from None
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise ValueError(f"{CONFIG_FLAG} {path}: TOML on Python 3.10 needs tomli (pip "
                                 "install tomli)") from None
        try:
            settings = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{CONFIG_FLAG} {path}: not TOML ({err})") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{CONFIG_FLAG} {path}: YAML needs PyYAML (pip install pyyaml); "
                             "or write the file as TOML") from None
        try:
            settings = yaml.safe_load(text)
        except yaml.YAMLError as err:
            detail = " ".join(str(err).split())
            raise ValueError(f"{CONFIG_FLAG} {path}: not YAML ({detail})") from None
        settings = {} if settings is None else settings
    else:
        raise ValueError(f"{CONFIG_FLAG} {path}: the name must end in .toml, .yaml or .yml")
    if not isinstance(settings, dict):
        raise ValueError(f"{CONFIG_FLAG} {path}: must hold a table of flag = value, "
                         f"not a {type(settings).__name__}")
    return settings


def apply_settings(parser: argparse.ArgumentParser, path: Path, settings: dict) -> None:
    """Makes `settings` the defaults of `parser` (one command's parser), each value checked as
    its flag checks it; flags given in the file are no longer required on the command line."""
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    defaults = {}
    for key, value in settings.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("help", "config"):
            known = sorted(flag.lstrip("-") for name, a in actions.items()
                           if name not in ("help", "config") for flag in a.option_strings[:1])
            raise ValueError(f"{CONFIG_FLAG} {path}: unknown key {key!r} (the flags of "
                             f"{parser.prog}: {', '.join(known)})")
        try:
            defaults[dest] = _converted(action, value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            raise ValueError(f"{CONFIG_FLAG} {path}: {key} = {value!r}: {err}") from None
        action.required = False
    parser.set_defaults(**defaults)


def _converted(action: argparse.Action, value):
    """`value` from the file as the command line would have given it after `action`."""
    if action.nargs == 0:  # a switch: store_true, or --x/--no-x
        if not isinstance(value, bool):
            raise TypeError("must be true or false")
        return value
    several = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if several != isinstance(value, list):
        raise TypeError("must be a list" if several else "must be a single value")
    items = value if several else [value]
    for item in items:
        if isinstance(item, (dict, list)) or item is None:
            raise TypeError(f"{item!r} is not a value this flag takes")
    converted = [_one(action, item) for item in items]
    return converted if several else converted[0]


def _one(action: argparse.Action, item):
    text = str(item).lower() if isinstance(item, bool) else str(item)
    value = action.type(text) if action.type is not None else text
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"must be one of {list(action.choices)}")
    return value


def write_settings(path: Path, settings: dict) -> None:
    """`settings` (flag name -> value; None left out) as TOML that read_settings reads back,
    written atomically."""
    lines = [f"# the settings of this run: directclr pretrain {CONFIG_FLAG} {path.name} "
             "repeats (resumes) it"]
    for name, value in settings.items():
        if value is not None:
            lines.append(f"{name.replace('_', '-')} = {_toml(value)}")
    data = ("\n".join(lines) + "\n").encode()
    from .files import atomic_write, write_bytes_durably  # imports torch: not at start-up
    atomic_write(path, lambda tmp: write_bytes_durably(tmp, data))


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} has no TOML form here")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
