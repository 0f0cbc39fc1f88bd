"""The settings of a pretraining run in one place. Each field of `Config` carries its flag's help,
range and choices; from them come `directclr pretrain`'s flags, their checks and `--help`
(`add_config_flags`), the check of a Config built in Python (`check_fields`), and the argv that
other code builds to launch a run (`pretrain_argv`).

This module imports only the standard library: `directclr --help` and the checks of a bad flag
answer without importing torch, and work where torchvision does not match it.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

# representation width; resnet18-wN: ResNet-18 with base width N instead of 64, for small runs
ARCHS = {"resnet18": 512, "resnet50": 2048, "resnet18-w32": 256, "resnet18-w16": 128}
ARCH_SOURCES = ("torchvision", "timm")  # --arch SOURCE:NAME: any classification model of these
MODES = ("directclr", "simclr-mlp", "simclr-linear", "simclr-none", "fixed-lowrank", "diagonal")
LOADERS = ("auto", "dali", "torchvision")
PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 on CUDA, fp32 on CPU
VARIANTS = ("cross", "ntxent")
# The paper's geometry (ResNet-50): d0 = 360 of the 2048-d representation, SimCLR's output 128.
PAPER_D0, PAPER_WIDTH, PAPER_SIMCLR_OUT = 360, 2048, 128
MIN_IMAGE_SIZE = 8  # pixels: below this the crops of the recipe have nothing left to crop
MIN_TEMPERATURE = 1e-30  # far below any useful tau; 1/tau stays finite in fp32
SEED_LIMIT = 2 ** 32  # numpy's generators take seeds below this
# Settings that change the math of a run: a resume must keep them (or accept the change).
RESUME_FIELDS = ("arch", "mode", "dim", "temperature", "variant", "batch_size", "image_size",
                 "seed", "lr", "wd", "warmup_epochs", "epochs", "max_steps", "loader",
                 "simclr_out", "micro_batch", "precision")
# Settings of one command, not of the run: <out>/config.toml leaves them out, so that rerunning
# from it resumes (never starts over, never accepts a change it was not told of).
INVOCATION_FIELDS = ("resume", "accept_changes")


def paper_dim(width: int) -> int:
    """d0 scaled with the representation as the paper's 360 of 2048 (90 of resnet18's 512)."""
    return max(1, round(width * PAPER_D0 / PAPER_WIDTH))


def path_problem(kind: str, text: str) -> str | None:
    """What is wrong with `text` as a path of this kind, or None: "file", "dir" and "existing"
    (either) must exist,
    "output_dir" may not exist yet (nothing is made before the command runs), "output_file"
    must not be a directory, "dataset" is an existing directory, 'fashion-mnist' or WebDataset
    shards (a path ending in .tar, brace-expanded as WebDataset writes them, every shard there),
    "splits" an existing directory (of train/ and val/ trees) or 'fashion-mnist'."""
    path = Path(text).expanduser()
    if kind in ("dataset", "splits") and text == "fashion-mnist":
        return None
    if kind == "dataset" and text.endswith(".tar"):
        from .data.shards import pattern_problem  # the data stack, only for such a value
        return pattern_problem(text)
    if kind in ("file", "dir", "dataset", "splits", "existing") and not path.exists():
        folder = kind in ("dir", "dataset", "splits")
        return f"{text}: no such {'directory' if folder else 'file'}"
    if kind in ("dir", "dataset", "splits", "output_dir") and path.exists() and not path.is_dir():
        return f"{text} is a file; it must name a directory"
    if kind in ("file", "output_file") and path.is_dir():
        return f"{text} is a directory; it must name a file"
    return None


def arch_problem(text: str) -> str | None:
    """What is wrong with `text` as --arch, or None; whether a torchvision:NAME or timm:NAME
    exists is checked where the model is built (this module imports neither)."""
    source, colon, name = text.partition(":")
    if text in ARCHS or (colon and source in ARCH_SOURCES and name.isidentifier()):
        return None
    return (f"must be one of {list(ARCHS)}, torchvision:NAME or timm:NAME, got {text!r}")


def setting(default=MISSING, help: str = "", *, low=None, above=None, below=None, choices=None,
            path: str | None = None, check=None, shown: str | None = None,
            metavar: str | None = None):
    """A Config field and its flag: `low` (inclusive) or `above` (exclusive) bounds a number,
    `below` caps an integer, `path` is a kind of path_problem, `check` returns what is wrong with
    a value (or None), `shown` is what --help says the default is when the value alone would
    not tell."""
    metadata = {"help": help, "low": low, "above": above, "below": below, "choices": choices,
                "path": path, "check": check, "shown": shown, "metavar": metavar}
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    data: str = setting(help="ImageFolder root of the training images (class folders), "
                        "WebDataset shards (a .tar path or brace pattern such as "
                        "'train-{0000..0099}.tar', or a directory of .tar files), or "
                        "'fashion-mnist' (prepared into --cache on first use)", path="dataset")
    out: str = setting(help="run directory: checkpoints, metrics.jsonl, backbone.pt; rerun the "
                       "same command to resume", path="output_dir")
    arch: str = setting("resnet50", f"backbone: one of {', '.join(ARCHS)} (resnet18-wN: "
                        "ResNet-18 of base width N), torchvision:NAME (any torchvision "
                        "classification model, e.g. torchvision:vit_b_16) or timm:NAME (timm "
                        "installed)", check=arch_problem, metavar="ARCH")
    mode: str = setting("directclr", "directclr, or a SimCLR baseline (its projector)",
                        choices=MODES)
    dim: int | None = setting(None, "d0, the width of the subvector r[:, :d0] the loss sees",
                              low=1, shown="the paper's 360/2048 of the backbone's width: 360 "
                              "for resnet50, 90 for resnet18")
    simclr_out: int = setting(128, "output width of the simclr-mlp and simclr-linear "
                              "projectors (the paper's 128)", low=1)
    temperature: float = setting(0.1, "InfoNCE's tau", low=MIN_TEMPERATURE)
    variant: str = setting("cross", "cross: the official loss (N x N); ntxent: SimCLR's "
                           "2N x 2N one", choices=VARIANTS)
    batch_size: int = setting(4096, "global batch of pairs, over all processes", low=2)
    micro_batch: int | None = setting(None, "pairs per micro-batch per process: the exact "
                                      "gradient of the whole batch with one micro-batch's "
                                      "activations (gradient caching)", low=1,
                                      shown="the whole batch at once", metavar="M")
    epochs: int = setting(100, "passes over --data", low=1)
    max_steps: int | None = setting(None, "stop after this many steps; warm-up and cosine then "
                                    "span this run", low=1, shown="--epochs decides")
    lr: float = setting(4.8, "LARS peak learning rate (not scaled by the batch)", above=0)
    wd: float = setting(1e-6, "weight decay (not on biases and norm parameters)", low=0)
    warmup_epochs: float = setting(10.0, "linear warm-up, cut to a tenth of the run", low=0)
    loader: str = setting("auto", "augmentation pipeline; auto: DALI where it imports, else "
                          "torchvision", choices=LOADERS)
    ckpt_every: int = setting(500, "steps between checkpoints (also at every epoch end)", low=1)
    keep_every: int | None = setting(None, "also checkpoint at multiples of this many steps and "
                                     "keep those (snapshots); others are pruned to the last 2",
                                     low=1, shown="keep only the last 2")
    log_every: int = setting(10, "steps between metrics writes and divergence checks (the only "
                             "host syncs of a GPU step; every step still gets its row)", low=1)
    resume: bool = setting(True, "resume from the newest checkpoint in --out; --no-resume starts "
                           "over, moving the old files to previous-<time>/")
    accept_changes: tuple[str, ...] = setting((), "settings a resume may change (e.g. epochs "
                                              "max-steps); the others must match the "
                                              "checkpoint's", choices=RESUME_FIELDS,
                                              shown="none", metavar="FLAG")
    precision: str = setting("auto", "the model's forward and backward under bf16 autocast (the "
                             "loss, the online probe's loss and the spectra in fp32) or in "
                             "fp32; auto: bf16 on CUDA, fp32 on CPU", choices=PRECISIONS)
    compile: bool = setting(False, "torch.compile the model (the first steps wait for the "
                            "compiler, about 2 minutes on CPU)")
    tensorboard: bool = setting(False, "also write the metrics as TensorBoard scalars into "
                                "--out/tensorboard")
    wandb: bool = setting(False, "also log the metrics, the rank figures and the settings to "
                          "Weights & Biases (pip install wandb; WANDB_PROJECT, WANDB_MODE=offline"
                          "...); a resume continues the same W&B run")
    seed: int = setting(0, "weights, data order, augmentations", low=0, below=SEED_LIMIT)
    image_size: int | None = setting(None, "pixels of each view", low=MIN_IMAGE_SIZE,
                                     shown="32 for fashion-mnist, else 224")
    num_threads: int | None = setting(None, "loader threads (DALI) or worker processes "
                                      "(torchvision); 0: torchvision decodes in the training "
                                      "process, DALI uses 1 thread", low=0,
                                      shown="min(8, CPU cores)")
    cache: str = setting("~/.cache/directclr", "where prepared datasets go", path="output_dir")


def flag(name: str) -> str:
    """The command-line flag of a Config field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def field_name(text: str) -> str:
    """The Config field of a flag as a user writes it: --max-steps, max-steps -> max_steps."""
    return text.lstrip("-").replace("-", "_")


def check_value(name: str, value, kind: type, meta: dict) -> None:
    """One field's value against its metadata; the error names the flag."""
    check = meta.get("check")
    if check is not None:
        problem = check(value) if isinstance(value, str) else f"must be a string, got {value!r}"
        if problem:
            raise ValueError(f"{flag(name)} {problem}")
        return
    choices = meta["choices"]
    if choices is not None:
        values = value if isinstance(value, tuple) else (value,)
        wrong = [item for item in values if item not in choices]
        if wrong:
            shown = [flag(c)[2:] for c in choices] if name == "accept_changes" else list(choices)
            raise ValueError(f"{flag(name)} must be one of {shown}, got {wrong[0]!r}")
        return
    if meta.get("path") and isinstance(value, (str, os.PathLike)):
        problem = path_problem(meta["path"], os.fspath(value))
        if problem:
            raise ValueError(f"{flag(name)} {problem}")
        return
    if value is None or kind in (str, bool):
        return
    low, above, below = meta["low"], meta["above"], meta["below"]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{flag(name)} must be an integer >= {low}, got {value!r}")
        if below is not None and value >= below:
            raise ValueError(f"{flag(name)} must be below 2**{below.bit_length() - 1}, "
                             f"got {value}")
        return
    bound = f"> {above}" if above is not None else f">= {low}"
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (above is not None and value <= above) or (low is not None and value < low)):
        raise ValueError(f"{flag(name)} must be finite and {bound}, got {value!r}")


def _kind(annotation: str) -> type:
    """The scalar type of an annotation as written above ('int | None' -> int)."""
    return {"str": str, "int": int, "float": float, "bool": bool}.get(
        annotation.split(" |")[0].replace("tuple[str, ...]", "str"), str)


def check_fields(cfg: Config) -> None:
    """Every field of `cfg` against its flag's range and choices (ValueError naming the flag)."""
    for f in fields(Config):
        check_value(f.name, getattr(cfg, f.name), _kind(f.type), f.metadata)


def _converter(name: str, kind: type, meta: dict):
    """argparse type= for a field: parses and range-checks, so a bad value is argparse's one-line
    error naming the flag, before anything runs."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = text  # check_value names what is wanted
        try:
            check_value(name, value, kind, meta)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(flag(name) + " ")) from None
        return value
    # what the flag takes, by name (argparse's "invalid <name> value"; tests pick bad values by it)
    check = meta.get("check")
    convert.__name__ = (meta.get("path") or (check and check.__name__.removesuffix("_problem"))
                        or ("choice" if meta["choices"] else kind.__name__))
    return convert


def bounded(kind: type, *, low=None, above=None, below=None):
    """argparse type= for a number flag outside Config: `low` inclusive, `above` exclusive."""
    meta = {"low": low, "above": above, "below": below, "choices": None}
    return _converter("value", kind, meta)


def path_type(kind: str):
    """argparse type= for a path flag outside Config (a kind of path_problem)."""
    meta = {"choices": None, "path": kind}
    return _converter("value", str, meta)


def checked_type(check):
    """argparse type= for a string flag outside Config that `check` finds fault with or not."""
    return _converter("value", str, {"choices": None, "check": check})


def _help(meta: dict, default) -> str:
    if default is MISSING:
        return meta["help"] + " (required)"
    shown = meta["shown"]
    if shown is None:
        shown = " ".join(default) if isinstance(default, tuple) else default
    return f"{meta['help']} (default: {shown})"


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """`directclr pretrain`'s flags, one per Config field."""
    for f in fields(Config):
        meta, kind = f.metadata, _kind(f.type)
        options = {"help": _help(meta, f.default), "dest": f.name}
        if kind is bool:
            options["action"] = (argparse.BooleanOptionalAction if f.default
                                 else "store_true")
        else:
            options["type"] = _converter(f.name, kind, meta)
            if meta["metavar"]:
                options["metavar"] = meta["metavar"]
            elif meta["choices"] and f.name != "accept_changes":
                options["metavar"] = "{" + ",".join(meta["choices"]) + "}"
            if f.name == "accept_changes":
                options.update(nargs="+", type=_accept)
        if f.default is MISSING:
            options["required"] = True
        else:
            options["default"] = f.default
        parser.add_argument(flag(f.name), **options)


def _accept(text: str) -> str:
    """A setting named by its flag (--max-steps or max-steps) that a resume may change."""
    name = field_name(text)
    if name not in RESUME_FIELDS:
        raise argparse.ArgumentTypeError(f"must be among {[flag(f)[2:] for f in RESUME_FIELDS]}"
                                         f", got {text!r}")
    return name


def config_from_args(args: argparse.Namespace) -> Config:
    values = {f.name: getattr(args, f.name) for f in fields(Config)}
    return Config(**{name: tuple(value) if isinstance(value, list) else value
                     for name, value in values.items()})


def pretrain_argv(**settings) -> list[str]:
    """`directclr pretrain`'s arguments for these Config fields (checked by name), so that code
    launching a run never spells a flag by hand."""
    known = {f.name: f for f in fields(Config)}
    argv = []
    for name, value in settings.items():
        if name not in known:
            raise ValueError(f"{name!r} is not a setting of directclr pretrain")
        if _kind(known[name].type) is bool:
            if value != known[name].default:  # store_true flags have no --no- form
                argv.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif isinstance(value, (tuple, list)):
            argv += [flag(name), *map(str, value)]
        elif value is not None:
            argv += [flag(name), str(value)]
    return argv
