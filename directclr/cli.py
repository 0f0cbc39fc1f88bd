"""The `directclr` command (also `python -m directclr`).

At start-up it imports only the standard library's modules (directclr.config, .config_file,
.stop_signals; the package's own names load on first use): main() catches the stop signals before
anything imports torch. Each command imports the rest (torchvision, the data stack) when it runs,
so `--help`, a bad flag and `directclr info` work even where torchvision does not match torch.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .config import (
    SEED_LIMIT,
    add_config_flags,
    arch_problem,
    bounded,
    checked_type,
    config_from_args,
    path_type,
)
from .config_file import CONFIG_FLAG, WRITTEN_NAME, apply_settings, read_settings
from .stop_signals import StopSignals

POSITIVE = bounded(int, low=1)
NON_NEGATIVE = bounded(int, low=0)
SEED = bounded(int, low=0, below=SEED_LIMIT)
IMAGE_SIZE = bounded(int, low=8)
RATE = bounded(float, above=0)
existing_file, existing_dir = path_type("file"), path_type("dir")
arch_type = checked_type(arch_problem)
splits, output_dir, output_file = (path_type(kind) for kind in ("splits", "output_dir",
                                                                "output_file"))
# How gloo and NCCL say that a collective's peer process is gone
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
             "remote process exited", "NCCL communicator was aborted")
# Commands that import torchvision and the rest of the [train] extra: checked first, so that a
# mismatched or missing package is one line, not a traceback from inside its import.
NEEDS_TRAINING_STACK = ("pretrain", "probe", "spectrum", "reproduce")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, unless the help line already says what it is or the flag is
    required (argparse would print "(default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or "(required)" in text or action.required:
            return text
        if action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the flag (no usage block), exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # "argument --lr: must be > 0" reads better as "--lr must be > 0"
        message = re.sub(r"^argument (\S+): ", r"\1 ", message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """With `COMMAND --config FILE`, the file's settings become COMMAND's defaults first
        (directclr.config_file), so that the command line overrides them."""
        argv = sys.argv[1:] if args is None else list(args)
        commands = next((action.choices for action in self._actions
                         if isinstance(action, argparse._SubParsersAction)), {})
        command = commands.get(next((arg for arg in argv if not arg.startswith("-")), None))
        if command is not None and CONFIG_FLAG in command._option_string_actions:
            found = Parser(prog=command.prog, add_help=False)
            found.add_argument(CONFIG_FLAG, type=Path)
            path = found.parse_known_args(argv)[0].config
            if path is not None:
                try:
                    apply_settings(command, path, read_settings(path))
                except ValueError as err:
                    command.error(str(err))
        return super().parse_args(argv, namespace)


# --------------------------------------------------------------------------- argument types
def device(text: str) -> str:
    """cpu, cuda or cuda:N, checked against this machine."""
    import torch
    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N)") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device here")
    if chosen.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda are supported")
    return text



def device_of(args) -> str:
    import torch
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


# --------------------------------------------------------------------------- commands
def _prepare(args) -> None:
    from .data import prepare_fashion_mnist, prepare_synthetic_splits, write_shards
    if args.dataset == "shards":
        if args.source is None:
            raise ValueError("prepare shards needs --from ROOT, the ImageFolder tree to write")
        shards = write_shards(args.source, args.out, args.shard_size, seed=args.seed)
        first, last = shards[0].name, shards[-1].name
        print(f"wrote {first} to {last} and classes.txt in {args.out}: pretrain --data "
              f"{args.out}")
        return
    if args.dataset == "fashion-mnist":
        out = prepare_fashion_mnist(args.out, limit=args.limit)
    else:
        if args.n < args.classes:
            raise ValueError(f"--n {args.n} must be at least --classes ({args.classes})")
        if args.min_side > args.max_side:
            raise ValueError(f"--min-side {args.min_side} must be <= --max-side "
                             f"({args.max_side})")
        out = prepare_synthetic_splits(args.out, args.n, args.val, classes=args.classes,
                                       seed=args.seed, min_side=args.min_side,
                                       max_side=args.max_side)
    print(f"wrote {out}/train and {out}/val")


def _add_prepare(commands) -> None:
    p = commands.add_parser("prepare", help="write a dataset as ImageFolder trees train/ and "
                            "val/, or an ImageFolder tree as WebDataset shards")
    p.add_argument("dataset", choices=["fashion-mnist", "synthetic", "shards"],
                   help="fashion-mnist: from Debian's dataset-fashion-mnist package; synthetic: "
                   "JPEGs of one pattern family per class (stripes, checks, rings, ...); shards: "
                   "the images of --from as WebDataset .tar shards")
    p.add_argument("--out", required=True, type=output_dir, help="output directory (required)")
    p.add_argument("--n", type=POSITIVE, default=800, help="synthetic: training images")
    p.add_argument("--val", type=POSITIVE, default=300,
                   help="synthetic: validation images (more than the representation's width, "
                   "for a spectrum that is not bounded by the sample size)")
    p.add_argument("--min-side", type=IMAGE_SIZE, default=64,
                   help="synthetic: the shortest image side drawn, pixels")
    p.add_argument("--max-side", type=IMAGE_SIZE, default=160,
                   help="synthetic: the longest image side drawn, pixels")
    p.add_argument("--classes", type=bounded(int, low=2), default=4,
                   help="synthetic: class folders")
    p.add_argument("--seed", type=SEED, default=0,
                   help="synthetic: the images drawn; shards: the order samples are written in")
    p.add_argument("--from", dest="source", type=existing_dir, default=None,
                   help="shards: the ImageFolder tree to write (required)")
    p.add_argument("--shard-size", type=POSITIVE, default=1000, help="shards: samples per shard")
    p.add_argument("--limit", type=POSITIVE, default=None,
                   help="fashion-mnist: at most this many images per split (default: all)")
    p.set_defaults(run=_prepare)


def _pretrain(args) -> int:
    import logging

    from .stop_signals import RunStopped
    from .train import pretrain
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        backbone = pretrain(config_from_args(args))
    except RunStopped as stopped:
        print(f"directclr pretrain: {stopped}", file=sys.stderr)
        code = stopped.exit_code
    except RuntimeError as err:
        if not lost_a_rank(err):
            raise
        # Another rank died (kill -9, the OOM killer): torchrun stops the job; the traceback of
        # this rank's collective would only bury the line that matters.
        print(f"directclr pretrain: error: rank {os.environ['RANK']} lost another rank "
              f"({' '.join(str(err).split())[:160]}); rerun the same command to resume from the "
              "newest checkpoint", file=sys.stderr)
        code = 1
    else:
        code = 0
        if backbone.exists() and _is_rank0():
            print(f"backbone: {backbone}\nmetrics: {backbone.parent / 'metrics.jsonl'}")
    if "RANK" in os.environ:  # under torchrun; everything is written
        exit_without_teardown(code)
    return code


def lost_a_rank(err: RuntimeError) -> bool:
    """Whether `err` is a collective that failed because a peer process is gone (gloo's and
    NCCL's words for it), under a launcher."""
    import torch.distributed as dist
    return "RANK" in os.environ and (isinstance(err, dist.DistNetworkError) or any(
        words in str(err) for words in PEER_GONE))


def exit_without_teardown(code: int = 0) -> None:
    """Exits at once, skipping the interpreter's teardown: after a DDP run on gloo, torch can
    abort the process there ("terminate called without an active exception"; 1 of 25 two-rank
    runs of a bare DDP step on this loaded 2-core machine), which torchrun reports as a failed
    run although nothing was left to do."""
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def add_config_file_flag(p) -> None:
    p.add_argument(CONFIG_FLAG, type=existing_file, default=None, metavar="FILE",
                   help="a TOML or YAML file of flag = value (flag names without --); the "
                   "command line overrides it (default: none)")


def _add_pretrain(commands) -> None:
    p = commands.add_parser("pretrain", help="DirectCLR / SimCLR-baseline pretraining",
                            description="Every flag is a field of directclr.config.Config. "
                            f"The run's settings go to <out>/{WRITTEN_NAME}: {CONFIG_FLAG} "
                            "reads it back.")
    add_config_file_flag(p)
    add_config_flags(p)
    p.set_defaults(run=_pretrain)


def _info(args) -> int:
    from .info import report
    lines, cpu_ok = report(build=args.build)
    print("\n".join(lines))
    return 0 if cpu_ok or not args.build else 1


def _add_info(commands) -> None:
    p = commands.add_parser("info", help="versions, and which backends work here")
    p.add_argument("--build", action="store_true",
                   help="build the C++ CPU kernels now if need be (exit 1 if they cannot be)")
    p.set_defaults(run=_info)


def build_parser() -> Parser:
    from . import __version__
    from .commands import add_probe, add_reproduce, add_spectrum, add_theory
    parser = Parser(prog="directclr", description="DirectCLR pretraining, probes, spectra and "
                    "the paper's theory; `directclr COMMAND --help` for each command.")
    parser.add_argument("--version", action="version", version=f"directclr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_prepare(commands)
    _add_pretrain(commands)
    add_probe(commands)
    add_spectrum(commands)
    add_theory(commands)
    add_reproduce(commands)
    _add_info(commands)
    from .plot import add_plot_parser
    add_plot_parser(commands)
    return parser


def main(argv=None) -> int:
    """Runs a command; returns its exit status (2 for a bad flag, 0 after --help, 75 for pretrain
    ended by a stop signal)."""
    # A scheduler may preempt pretrain while it starts (imports, the data, the model): caught
    # from here on, a stop signal ends it like one during training, exit 75 (train.pretrain takes
    # it over). The other commands write no checkpoint to resume from: a signal caught while their
    # command line is read goes to the handler it would have met, the default one ending them.
    with StopSignals(announce=False) as start_up:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help, --version, or a bad flag (one line printed)
            args = done
        if isinstance(args, argparse.Namespace) and args.command == "pretrain":
            code = _run(args, argv)
            start_up.ignore_after()  # the run is over, checkpointed or done
            return code
    start_up.hand_back()
    return args.code if isinstance(args, SystemExit) else _run(args, argv)


def _run(args: argparse.Namespace, argv) -> int:
    if argv is not None and args.command == "reproduce":
        args.argv = list(argv)
    try:
        if args.command in NEEDS_TRAINING_STACK:
            from .info import training_stack
            works, why = training_stack()
            if not works:
                raise ImportError(why)
        return args.run(args) or 0
    except (ValueError, OSError, ChildProcessError, ImportError) as err:  # OSError: a full disk
        print(f"directclr {args.command}: error: {err}", file=sys.stderr)
        if "RANK" in os.environ:
            exit_without_teardown(2)
        return 2


if __name__ == "__main__":
    sys.exit(main())
