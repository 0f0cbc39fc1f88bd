"""The commands that evaluate and reproduce (`directclr probe`, `spectrum`, `theory`,
`reproduce`): their flags and what each runs. directclr.cli holds the command line itself, the
flag types they share, and the commands that prepare data and train.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .cli import (
    IMAGE_SIZE,
    NON_NEGATIVE,
    POSITIVE,
    RATE,
    SEED,
    add_config_file_flag,
    arch_type,
    device,
    device_of,
    existing_dir,
    existing_file,
    output_dir,
    output_file,
    splits,
)
from .config import ARCHS, LOADERS, MODES


def _probe(args) -> None:
    from .probe import linear_probe
    data = args.data
    if data == "fashion-mnist":
        from .data import prepare_fashion_mnist
        data = prepare_fashion_mnist(Path(args.cache).expanduser() / "fashion-mnist")
    result = linear_probe(args.checkpoint, data, arch=args.arch, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, subvector=args.subvector,
                          image_size=args.image_size, num_workers=args.num_workers,
                          limit=args.limit, device=device_of(args), out=args.out)
    what = f"r[:, :{args.subvector}]" if args.subvector else "the whole representation"
    print(f"linear probe on {what}: best val top-1 {100 * result['top1_best']:.2f}% "
          f"({result['epochs']} epochs, {result['train_images']} train images)\n"
          f"wrote {result['path']}")


def _add_backbone_flags(p, subvector_help: str, limit_help: str) -> None:
    """The flags probe and spectrum share: which backbone, which part of r, which images."""
    add_config_file_flag(p)
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


def add_probe(commands) -> None:
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
                                device=device_of(args))
    label = f"r[:, :{args.subvector}]" if args.subvector else "representation"
    json_path, png_path = write_report(spectrum, args.out, label)
    print(f"{label}: effective rank {spectrum.effective_rank:.1f}, {spectrum.collapsed()} of "
          f"{spectrum.eigenvalues.numel()} dimensions collapsed (< 1e-6 x the largest)\n"
          f"wrote {json_path} and {png_path}")


def add_spectrum(commands) -> None:
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


def add_theory(commands) -> None:
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


def add_reproduce(commands) -> None:
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
