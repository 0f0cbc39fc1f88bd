"""The `directclr` command (also `python -m directclr`)."""
from __future__ import annotations

import argparse
import os
import sys

from .data.loader import BACKENDS as LOADERS
from .infonce import VARIANTS
from .models import ARCHS


def _prepare(args) -> None:
    from .data import prepare_fashion_mnist, prepare_synthetic
    if args.dataset == "fashion-mnist":
        out = prepare_fashion_mnist(args.out, limit=args.limit)
    else:
        out = prepare_synthetic(args.out, args.n, classes=args.classes, seed=args.seed)
    print(f"wrote {out}")


def _pretrain(args) -> None:
    import logging
    from dataclasses import fields

    from .train import Config, RunStopped, pretrain
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
    try:
        backbone = pretrain(cfg)
    except RunStopped as stopped:
        print(f"directclr pretrain: {stopped}", file=sys.stderr)
        code = stopped.exit_code
    else:
        code = 0
        if backbone.exists():
            print(f"backbone: {backbone}\nmetrics: {backbone.parent / 'metrics.jsonl'}")
    if "RANK" in os.environ:  # under torchrun; everything is written
        exit_without_teardown(code)
    return code


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


def _add_pretrain(commands) -> None:
    from .models import MODES
    from .train import Config
    d = Config(data="", out="")
    p = commands.add_parser("pretrain", help="DirectCLR / SimCLR-baseline pretraining",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root, or 'fashion-mnist'")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics)")
    p.add_argument("--arch", default=d.arch, choices=list(ARCHS), help="backbone")
    p.add_argument("--mode", default=d.mode, choices=MODES,
                   help="directclr, or a SimCLR baseline (its projector)")
    p.add_argument("--dim", type=int, default=d.dim, help="d0, the subvector width")
    p.add_argument("--simclr-out", type=int, default=d.simclr_out,
                   help="output width of the simclr-mlp and simclr-linear projectors")
    p.add_argument("--temperature", type=float, default=d.temperature, help="InfoNCE's tau")
    p.add_argument("--variant", default=d.variant, choices=VARIANTS,
                   help="the official loss, or SimCLR's 2N x 2N one")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch of pairs, over all ranks")
    p.add_argument("--micro-batch", type=int, default=None, metavar="M",
                   help="pairs per micro-batch per process: the exact gradient of the whole "
                   "batch with one micro-batch's activations (gradient caching)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over --data")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps; warm-up and cosine then span this run")
    p.add_argument("--lr", type=float, default=d.lr, help="LARS peak learning rate")
    p.add_argument("--wd", type=float, default=d.wd, help="weight decay")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help="linear warm-up, at most a tenth of the run")
    p.add_argument("--loader", default=d.loader, choices=LOADERS,
                   help="auto: DALI where it imports")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every,
                   help="steps between checkpoints (also at every epoch end)")
    p.add_argument("--keep-every", type=int, default=None,
                   help="also checkpoint at multiples of this many steps and keep those "
                   "(snapshots for training dynamics); others are pruned to the last 2")
    p.add_argument("--log-every", type=int, default=d.log_every,
                   help="steps between metrics writes and divergence checks (the only host "
                   "syncs of a GPU step; every step still gets its row)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="resume from the newest checkpoint in --out; --no-resume starts over, "
                   "moving the old files to previous-<time>/")
    p.add_argument("--accept-changes", nargs="+", default=(), metavar="FLAG",
                   type=lambda name: name.lstrip("-").replace("-", "_"),
                   help="settings a resume may change (e.g. epochs max-steps); the others must "
                   "match the checkpoint's")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the metrics as TensorBoard scalars into --out/tensorboard")
    p.add_argument("--seed", type=int, default=d.seed, help="weights, data order, augmentations")
    p.add_argument("--image-size", type=int, default=None,
                   help="pixels; None: 32 for fashion-mnist, else 224")
    p.add_argument("--num-threads", type=int, default=None,
                   help="loader threads or workers; None: min(8, cores)")
    p.add_argument("--cache", default=d.cache, help="where prepared datasets go")
    p.set_defaults(run=_pretrain)


def _probe(args) -> None:
    from pathlib import Path

    import torch

    from .data import prepare_fashion_mnist
    from .probe import linear_probe
    data = args.data
    if data == "fashion-mnist":
        data = prepare_fashion_mnist(Path(args.cache).expanduser() / "fashion-mnist")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = linear_probe(args.checkpoint, data, arch=args.arch, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, subvector=args.subvector,
                          image_size=args.image_size, num_workers=args.num_workers,
                          limit=args.limit, device=device)
    what = f"r[:, :{args.subvector}]" if args.subvector else "the whole representation"
    print(f"linear probe on {what}: best val top-1 {100 * result['top1_best']:.2f}% "
          f"({result['epochs']} epochs, {result['train_images']} train images)")


def _add_probe(commands) -> None:
    p = commands.add_parser("probe", help="linear probe of a pretrained backbone")
    p.add_argument("--checkpoint", required=True, help="backbone.pt or a training checkpoint")
    p.add_argument("--data", required=True,
                   help="root with train/ and val/ ImageFolder trees, or 'fashion-mnist'")
    p.add_argument("--arch", default=None, choices=list(ARCHS),
                   help="only for a backbone.pt that does not record its arch (older files)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--subvector", type=int, default=None, metavar="D0",
                   help="probe only r[:, :D0] (DirectCLR's subvector)")
    p.add_argument("--image-size", type=int, default=None,
                   help="pixels; default: the size the backbone was trained at")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per split")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--cache", default="~/.cache/directclr")
    p.set_defaults(run=_probe)


def _spectrum(args) -> None:
    import torch

    from .report import dataset_spectrum, write_report
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    spectrum = dataset_spectrum(args.checkpoint, args.data, arch=args.arch,
                                image_size=args.image_size, subvector=args.subvector,
                                normalize=not args.no_normalize, limit=args.limit,
                                device=device)
    label = f"r[:, :{args.subvector}]" if args.subvector else "representation"
    json_path, png_path = write_report(spectrum, args.out, label)
    print(f"{label}: effective rank {spectrum.effective_rank:.1f}, {spectrum.collapsed()} of "
          f"{spectrum.eigenvalues.numel()} dimensions collapsed (< 1e-6 x the largest)\n"
          f"wrote {json_path} and {png_path}")


def _add_spectrum(commands) -> None:
    p = commands.add_parser("spectrum", help="embedding spectrum of a trained backbone")
    p.add_argument("--checkpoint", required=True, help="backbone.pt or a training checkpoint")
    p.add_argument("--data", required=True, help="an ImageFolder root (e.g. .../val)")
    p.add_argument("--out", required=True, help="where spectrum.json and spectrum.png go")
    p.add_argument("--arch", default=None, choices=list(ARCHS),
                   help="only for a backbone.pt that does not record its arch (older files)")
    p.add_argument("--subvector", type=int, default=None, metavar="D0",
                   help="the spectrum of r[:, :D0] instead of the whole representation")
    p.add_argument("--image-size", type=int, default=None,
                   help="pixels; default: the size the backbone was trained at")
    p.add_argument("--no-normalize", action="store_true",
                   help="skip the L2 normalization of rows (the official script normalizes)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images")
    p.add_argument("--device", default=None)
    p.set_defaults(run=_spectrum)


def _theory(args) -> None:
    import json
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
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}/{args.experiment}.json and {args.out}/{args.experiment}.png")


def _add_theory(commands) -> None:
    p = commands.add_parser("theory", help="the paper's linear-network simulations (Sec. 3-4)")
    p.add_argument("experiment", choices=["strong-aug", "implicit-reg", "projector"])
    p.add_argument("--out", required=True, help="where <experiment>.json and .png go")
    p.add_argument("--steps", type=int, help="SGD steps (default 1500)")
    p.add_argument("--lr", type=float, help="SGD learning rate (default 0.1)")
    p.add_argument("--batch", type=int, help="samples per step (default 128)")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--amplitudes", type=float, nargs="+",
                   help="strong-aug: augmentation amplitudes k (default 0.5 1 2 4)")
    p.add_argument("--amplitude", type=float, help="implicit-reg/projector: k (default 0.5)")
    p.add_argument("--init", choices=["spectrum", "gaussian"],
                   help="implicit-reg/projector: initialization (default spectrum)")
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
        raise SystemExit(f"--out {args.out}: no finished run with this budget")
    for row in rows:
        print(f"{row['mode']:28s} linear {row['probe_top1_mean']:6.2f} ± "
              f"{row['probe_top1_std']:.2f}  k-NN {row['knn_top1_mean']:6.2f} ± "
              f"{row['knn_top1_std']:.2f}  effective rank (centered) "
              f"{row['effective_rank']:6.1f}  RankMe (raw) {row['rankme_raw']:6.1f}")
    print(f"wrote {args.out}/results.md, results.json, runs.json, spectra.png and dynamics.png")


def _add_reproduce(commands) -> None:
    from .models import MODES
    from .reproduce import LONG_MODES, Budget
    d = Budget()
    long = ", ".join(LONG_MODES)
    p = commands.add_parser("reproduce", help="the paper's Tables 1-2 in miniature "
                            "(Fashion-MNIST, every mode x seed, and the untrained backbone)")
    p.add_argument("--out", required=True,
                   help="results.md/json, spectra.png, dynamics.png, runs/, data/")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int,
                   help=f"pretraining epochs of the modes other than {long} (default {d.epochs})")
    p.add_argument("--long-epochs", type=int,
                   help=f"pretraining epochs of {long} (default {d.long_epochs})")
    p.add_argument("--snapshot-every", type=int, help="steps between training-dynamics "
                   f"snapshots (kept checkpoints; default {d.snapshot_every})")
    p.add_argument("--dynamics-images", type=int, help="the fixed validation subset the "
                   f"snapshots are measured on (default {d.dynamics_images})")
    p.add_argument("--images", type=int, help=f"training images (default {d.images})")
    p.add_argument("--probe-epochs", type=int, help="default 30")
    p.add_argument("--arch", choices=list(ARCHS), help="default resnet18-w16")
    p.add_argument("--loader", default="auto", choices=LOADERS)
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


def main(argv=None) -> int:
    from . import __version__
    parser = argparse.ArgumentParser(prog="directclr", description=__doc__)
    parser.add_argument("--version", action="version", version=f"directclr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="write a dataset as an ImageFolder tree")
    prepare.add_argument("dataset", choices=["fashion-mnist", "synthetic"])
    prepare.add_argument("--out", required=True, help="output directory")
    prepare.add_argument("--n", type=int, default=1000, help="synthetic: number of images")
    prepare.add_argument("--classes", type=int, default=4, help="synthetic: class folders")
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--limit", type=int, default=None,
                         help="fashion-mnist: at most this many images per split")
    prepare.set_defaults(run=_prepare)
    _add_pretrain(commands)
    _add_probe(commands)
    _add_spectrum(commands)
    _add_theory(commands)
    _add_reproduce(commands)
    _add_info(commands)
    from .plot import add_plot_parser
    add_plot_parser(commands)
    args = parser.parse_args(argv)
    if argv is not None and args.command == "reproduce":
        args.argv = list(argv)
    try:
        return args.run(args) or 0
    except (ValueError, OSError, ChildProcessError, ImportError) as err:  # OSError: a full disk
        print(f"directclr {args.command}: error: {err}", file=sys.stderr)
        if "RANK" in os.environ:
            exit_without_teardown(2)
        return 2


if __name__ == "__main__":
    sys.exit(main())
