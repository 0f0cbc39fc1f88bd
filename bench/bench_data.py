"""Data benchmark: pairs of views per second, DALI vs torchvision, same cores, same JPEGs, read
from an ImageFolder tree and from WebDataset shards of it.

Standalone (prints a table, appends JSON rows to bench/results/bench_data.jsonl):

    python bench/bench_data.py                      # CPU: DALI-CPU vs torchvision, 2 threads
    python bench/bench_data.py --device cuda --threads 16

The images are `directclr prepare synthetic` JPEGs of ImageNet-like sizes (300-500 px sides),
made once under --data, and `directclr prepare shards` of them, made once beside it
(<data>-shards). Each backend and format runs in a fresh subprocess: one warm-up batch (worker
and pipeline start-up, the shards' cached index read), then --batches timed batches at 224 px
with the official recipe.

--step-ms stands in for the training step on an accelerator: the consumer sleeps that long per
batch, leaving the CPU to the loader. A loader that works ahead hides its time behind it
(pairs/s near batch_size / step, a short wait in next()); one that does not adds the two.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

if __package__:  # imported as bench.bench_data (the tests)
    from . import common
else:  # run as a script, python bench/bench_data.py: bench/ is sys.path[0]
    import common


SHARD_SIZE = 100  # samples per shard: 6 shards of the default 600 images


def shards_of(root: Path) -> Path:
    """`directclr prepare shards` of `root`, made once beside it (a .complete marker: an
    interrupted run starts over)."""
    out = root.with_name(root.name + "-shards")
    if not (out / ".complete").exists():
        from directclr.data import write_shards
        shutil.rmtree(out, ignore_errors=True)
        write_shards(root, out, SHARD_SIZE)
        (out / ".complete").touch()
    return out


def run_backend(backend, root, device, threads, batch_size, batches, image_size,
                step_ms=0.0) -> dict:
    import torch

    from directclr.data import build_pretrain_loader

    loader = build_pretrain_loader(root, batch_size, backend=backend, device=device,
                                   image_size=image_size, num_threads=threads)
    stream = iter(loader)
    next(stream)  # warm-up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    done = 0
    waits = []  # seconds the consumer spent inside next(), per batch
    for _ in range(batches):
        asked = time.perf_counter()
        try:
            next(stream)
        except StopIteration:
            stream = iter(loader)
            next(stream)
        waits.append(time.perf_counter() - asked)
        time.sleep(step_ms / 1000)
        done += 1
    sync()
    seconds = time.perf_counter() - start
    return {"op": "data", "backend": backend, "device": device, "threads": threads,
            "batch_size": batch_size, "image_size": image_size, "batches": done,
            "step_ms": step_ms, "pairs_per_s": done * batch_size / seconds,
            "wait_ms_median": 1000 * sorted(waits)[len(waits) // 2], "status": "ok"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/directclr_bench_jpegs"))
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backends", nargs="+", default=["dali", "torchvision"])
    parser.add_argument("--formats", nargs="+", default=["folder", "shards"],
                        choices=["folder", "shards"],
                        help="the JPEGs as an ImageFolder tree, as WebDataset shards")
    parser.add_argument("--step-ms", type=float, default=0.0,
                        help="simulated accelerator step per batch (ms), the CPU left idle")
    args = common.parse_or_run_child(parser, argv, lambda case: run_backend(**case))
    if args is None:
        return []
    common.imagenet_like_jpegs(args.data, args.images)
    roots = {"folder": args.data}
    if "shards" in args.formats:
        roots["shards"] = shards_of(args.data)
    rows = []
    for data_format in args.formats:
        for backend in args.backends:
            case = dict(backend=backend, root=str(roots[data_format]), device=args.device,
                        threads=args.threads, batch_size=args.batch_size, batches=args.batches,
                        image_size=args.image_size, step_ms=args.step_ms)
            rows.append({"op": "data", "format": data_format,
                         **common.run_child(__file__, case, timeout=1800)})
            print(json.dumps(rows[-1]), flush=True)
        ok = {r["backend"]: r for r in rows if r["status"] == "ok" and r["format"] == data_format}
        if "torchvision" in ok:
            for row in ok.values():
                row["vs_torchvision"] = row["pairs_per_s"] / ok["torchvision"]["pairs_per_s"]
    rows = common.stamp(rows, args.device)
    path = common.append_rows(rows, "bench_data", args.results_dir)
    print(common.format_table(rows, ["backend", "format", "device", "threads", "image_size",
                                     "batch_size", "step_ms", "pairs_per_s", "wait_ms_median",
                                     "vs_torchvision", "status"]))
    print(f"rows appended to {path}")
    return rows


if __name__ == "__main__":
    main()
