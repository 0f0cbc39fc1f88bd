"""The `directclr` command (also `python -m directclr`)."""
from __future__ import annotations

import argparse
import sys


def _prepare(args) -> None:
    from .data import prepare_fashion_mnist, prepare_synthetic
    if args.dataset == "fashion-mnist":
        out = prepare_fashion_mnist(args.out, limit=args.limit)
    else:
        out = prepare_synthetic(args.out, args.n, classes=args.classes, seed=args.seed)
    print(f"wrote {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="directclr", description=__doc__)
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
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"directclr {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
