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
    ARCHS,
    LOADERS,
    MODES,
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



def _device(args) -> str:
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


def _add_config_file_flag(p) -> None:
    p.add_argument(CONFIG_FLAG, type=existing_file, default=None, metavar="FILE",
                   help="a TOML or YAML file of flag = value (flag names without --); the "
                   "command line overrides it (default: none)")


def _add_pretrain(commands) -> None:
    p = commands.add_parser("pretrain", help="DirectCLR / SimCLR-baseline pretraining",
                            description="Every flag is a field of directclr.config.Config. "
                            f"The run's settings go to <out>/{WRITTEN_NAME}: {CONFIG_FLAG} "
                            "reads it back.")
    _add_config_file_flag(p)
    add_config_flags(p)
    p.set_defaults(run=_pretrain)


def _probe(args) -> None:
    from .probe import linear_probe
    data = args.data
    if data == "fashion-mnist":
        from .data import prepare_fashion_mnist
        data = prepare_fashion_mnist(Path(args.cache).expanduser() / "fashion-mnist")
    result = linear_probe(args.checkpoint, data, arch=args.arch, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, subvector=args.subvector,
                          image_size=args.image_size, num_workers=args.num_workers,
                          limit=args.limit, device=_device(args), out=args.out)
    what = f"r[:, :{args.subvector}]" if args.subvector else "the whole representation"
    print(f"linear probe on {what}: best val top-1 {100 * result['top1_best']:.2f}% "
          f"({result['epochs']} epochs, {result['train_images']} train images)\n"
          f"wrote {result['path']}")


def _add_backbone_flags(p, subvector_help: str, limit_help: str) -> None:
    """The flags probe and spectrum share: which backbone, which part of r, which images."""
    _add_config_file_flag(p)
    p.add_argument("--checkpoint", required=True, type=existing_file,
                   help="backbone.pt or a training checkpoint (required)")
    p.add_argument("--arch", default=None, type=arch_type, metavar="ARCH",
                   help="only for a backbone.pt that does not record its arch (default: the "
                   "one it records)")
    p.add_argument("--subvector", type=POSITIVE, default=None, metavar="D0", help=subvector_help)
    p.add_argument("--image-size", type=IMAGE_SIZE, default=None,
                   help="pixels (default: the size the backbone was trained at)")
    p.add_argument("--limit", type=POSITIVE, default=None, help=limit_help)
    p.add_argument("--device", type=device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda where there is one)")


def _add_probe(commands) -> None:
    p = commands.add_parser("probe", help="linear probe of a pretrained backbone")
    _add_backbone_flags(p, "probe only r[:, :D0], DirectCLR's subvector (default: all of r)",
                        "at most this many images per split (default: all)")
    p.add_argument("--data", required=True, type=splits,
                   help="root with train/ and val/ ImageFolder trees, or 'fashion-mnist' "
                   "(required)")
    p.add_argument("--out", type=output_file, default=None,
                   help="the result's JSON file (default: probe-<checkpoint name>.json beside "
                   "the checkpoint, -d<D0> added with --subvector)")
    p.add_argument("--epochs", type=POSITIVE, default=100, help="passes over train/")
    p.add_argument("--batch-size", type=POSITIVE, default=256, help="images per SGD step")
    p.add_argument("--lr", type=RATE, default=0.1, help="SGD learning rate (cosine decay)")
    p.add_argument("--num-workers", type=NON_NEGATIVE, default=0,
                   help="loader worker processes; 0: load in this process")
    p.add_argument("--cache", type=output_dir, default="~/.cache/directclr",
                   help="where --data fashion-mnist is prepared")
    p.set_defaults(run=_probe)


def _spectrum(args) -> None:
    from .report import dataset_spectrum, write_report
    spectrum = dataset_spectrum(args.checkpoint, args.data, arch=args.arch,
                                image_size=args.image_size, subvector=args.subvector,
                                normalize=not args.no_normalize, limit=args.limit,
                                device=_device(args))
    label = f"r[:, :{args.subvector}]" if args.subvector else "representation"
    json_path, png_path = write_report(spectrum, args.out, label)
    print(f"{label}: effective rank {spectrum.effective_rank:.1f}, {spectrum.collapsed()} of "
          f"{spectrum.eigenvalues.numel()} dimensions collapsed (< 1e-6 x the largest)\n"
          f"wrote {json_path} and {png_path}")


def _add_spectrum(commands) -> None:
    p = commands.add_parser("spectrum", help="embedding spectrum of a trained backbone")
    _add_backbone_flags(p, "the spectrum of r[:, :D0] (default: all of r)",
                        "at most this many images (default: all)")
    p.add_argument("--data", required=True, type=existing_dir,
                   help="an ImageFolder root, e.g. .../val (required)")
    p.add_argument("--out", required=True, type=output_dir,
                   help="where spectrum.json and spectrum.png go (required)")
    p.add_argument("--no-normalize", action="store_true",
                   help="skip the L2 normalization of rows (the official script normalizes)")
    p.set_defaults(run=_spectrum)


def _summary_lines(summary, indent: str = "") -> list[str]:
    """The scalars of a theory summary, one line per record (its lists of numbers stay in the
    JSON file)."""
    records = summary if isinstance(summary, list) else [summary]
    lines = []
    for record in records:
        scalars = [f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                   for key, value in record.items() if isinstance(value, (int, float, str))]
        if scalars:
            lines.append(indent + ", ".join(scalars))
        for key, value in record.items():
            if isinstance(value, dict) or (isinstance(value, list) and value
                                           and isinstance(value[0], dict)):
                lines.append(f"{indent}{key}:")
                lines += _summary_lines(value, indent + "  ")
    return lines


def _theory(args) -> None:
    from dataclasses import fields, replace

    from .theory import StrongAug, TwoLayer, run_experiment
    config = StrongAug() if args.experiment == "strong-aug" else TwoLayer()
    names = {f.name for f in fields(config)}
    foreign = [k for k in ("amplitudes", "amplitude", "init")
               if getattr(args, k) is not None and k not in names]
    if foreign:
        raise ValueError(f"--{foreign[0]} does not apply to {args.experiment}")
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    summary = run_experiment(args.experiment, args.out, replace(config, **overrides))
    print("\n".join(_summary_lines(summary)))
    print(f"wrote {args.out}/{args.experiment}.json (with the singular values) and "
          f"{args.out}/{args.experiment}.png")


def _add_theory(commands) -> None:
    from .theory import StrongAug, TwoLayer
    strong, two = StrongAug(), TwoLayer()
    p = commands.add_parser("theory", help="the paper's linear-network simulations (Sec. 3-4)")
    p.add_argument("experiment", choices=["strong-aug", "implicit-reg", "projector"],
                   help="strong-aug: Sec. 3; implicit-reg: Sec. 4; projector: Sec. 5's "
                   "propositions")
    p.add_argument("--out", required=True, type=output_dir,
                   help="where <experiment>.json and .png go (required)")
    p.add_argument("--steps", type=POSITIVE, help=f"SGD steps (default: {strong.steps})")
    p.add_argument("--lr", type=RATE, help=f"SGD learning rate (default: {strong.lr})")
    p.add_argument("--batch", type=POSITIVE, help=f"samples per step (default: {strong.batch})")
    p.add_argument("--seed", type=SEED, help=f"the draws (default: {strong.seed})")
    p.add_argument("--amplitudes", type=RATE, nargs="+",
                   help="strong-aug: augmentation amplitudes k (default: "
                   f"{' '.join(map(str, strong.amplitudes))})")
    p.add_argument("--amplitude", type=RATE,
                   help=f"implicit-reg/projector: k (default: {two.amplitude})")
    p.add_argument("--init", choices=["spectrum", "gaussian"],
                   help=f"implicit-reg/projector: initialization (default: {two.init})")
    p.set_defaults(run=_theory)


def _reproduce(args) -> None:
    import shlex

    from .reproduce import Budget, reproduce, write_reports
    given = {"arch": args.arch, "images": args.images, "epochs": args.epochs,
             "long_epochs": args.long_epochs, "probe_epochs": args.probe_epochs,
             "loader": args.loader, "snapshot_every": args.snapshot_every,
             "dynamics_images": args.dynamics_images}
    budget = Budget(**{k: v for k, v in given.items() if v is not None})
    command = "directclr " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)
    if args.report_only:
        rows = write_reports(args.out, budget, command)
    else:
        rows = reproduce(args.out, modes=args.modes, seeds=args.seeds, budget=budget,
                         command=command)
    if not rows:
        raise ValueError(f"--out {args.out}: no finished run with this budget")
    for row in rows:
        print(f"{row['mode']:28s} linear {row['probe_top1_mean']:6.2f} ± "
              f"{row['probe_top1_std']:.2f}  k-NN {row['knn_top1_mean']:6.2f} ± "
              f"{row['knn_top1_std']:.2f}  effective rank (centered) "
              f"{row['effective_rank']:6.1f}  RankMe (raw) {row['rankme_raw']:6.1f}")
    print(f"wrote {args.out}/results.md, results.json, runs.json, spectra.png and dynamics.png")


def _add_reproduce(commands) -> None:
    from .reproduce import LONG_MODES, Budget
    d = Budget()
    long = ", ".join(LONG_MODES)
    p = commands.add_parser("reproduce", help="the paper's Tables 1-2 in miniature "
                            "(Fashion-MNIST, every mode x seed, and the untrained backbone)")
    p.add_argument("--out", required=True, type=output_dir,
                   help="results.md/json, spectra.png, dynamics.png, runs/, data/ (required)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                   help="the modes to train")
    p.add_argument("--seeds", nargs="+", type=SEED, default=[0, 1, 2], help="one run per seed")
    p.add_argument("--epochs", type=POSITIVE,
                   help=f"pretraining epochs of the modes other than {long} (default: "
                   f"{d.epochs})")
    p.add_argument("--long-epochs", type=POSITIVE,
                   help=f"pretraining epochs of {long} (default: {d.long_epochs})")
    p.add_argument("--snapshot-every", type=POSITIVE, help="steps between training-dynamics "
                   f"snapshots, kept checkpoints (default: {d.snapshot_every})")
    p.add_argument("--dynamics-images", type=POSITIVE, help="the fixed validation subset the "
                   f"snapshots are measured on (default: {d.dynamics_images})")
    p.add_argument("--images", type=POSITIVE, help=f"training images (default: {d.images})")
    p.add_argument("--probe-epochs", type=POSITIVE,
                   help=f"linear-probe epochs (default: {d.probe_epochs})")
    p.add_argument("--arch", choices=list(ARCHS), help=f"backbone (default: {d.arch})")
    p.add_argument("--loader", default="auto", choices=LOADERS, help="augmentation pipeline")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite results.md/json and the figures from the runs already finished "
                        "in --out (e.g. copied from other machines); train nothing")
    p.set_defaults(run=_reproduce, argv=None)


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
    parser = Parser(prog="directclr", description="DirectCLR pretraining, probes, spectra and "
                    "the paper's theory; `directclr COMMAND --help` for each command.")
    parser.add_argument("--version", action="version", version=f"directclr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_prepare(commands)
    _add_pretrain(commands)
    _add_probe(commands)
    _add_spectrum(commands)
    _add_theory(commands)
    _add_reproduce(commands)
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
