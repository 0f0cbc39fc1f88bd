"""Training-loop benchmark: pairs/s of the whole `directclr pretrain` loop (data included) beside
the model alone on batches already in memory, and the fraction of loop time spent waiting for
data.

Standalone (prints a table, appends JSON rows to bench/results/bench_train.jsonl):

    python bench/bench_train.py                      # CPU: resnet18, 32 px, Fashion-MNIST
    python bench/bench_train.py --device cuda --arch resnet50 --image-size 224 \
        --batch-size 256 --data synthetic            # GPU: bf16 autocast, channels_last

Each measurement runs in a fresh subprocess. The model alone repeats `train_step` (the loop's
own step: forward of both views, fused loss, online probe, LARS) on one random batch. The whole
loop is `pretrain` itself; its per-step rows in metrics.jsonl give the rate and the data wait.
The first --warmup steps of each are not timed (the loop logs every --warmup steps, so that
they form their own log intervals).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from directclr.models import ARCHS

if __package__:  # imported as bench.bench_train (the tests)
    from . import common
else:  # run as a script, python bench/bench_train.py: bench/ is sys.path[0]
    import common

SYNTHETIC_IMAGES = 2000  # ImageNet-sized JPEGs (300-500 px sides) for the 224 px whole loop


def _config(case: dict, data: str, out: str):
    from directclr.config import Config
    return Config(data=data, out=out, arch=case["arch"], mode=case["mode"], dim=case["dim"],
                  batch_size=case["batch_size"], epochs=1000,
                  max_steps=case["warmup"] + case["steps"], lr=0.1, warmup_epochs=0,
                  loader=case["loader"], ckpt_every=10**9, resume=False,
                  # The warm-up steps fill the first log intervals, whose shared rate is not timed.
                  log_every=max(1, case["warmup"]),
                  compile=case["compile"], image_size=case["image_size"],
                  num_threads=case["threads"], micro_batch=case.get("micro_batch"))


def model_alone(case: dict) -> dict:
    import torch

    from directclr.lars import LARS
    from directclr.train import build_model, train_step
    device = torch.device(case["device"])
    cfg = _config(case, "", "")
    model = build_model(cfg, 10, case["image_size"] <= 64, device)
    optimizer = LARS(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    forward = torch.compile(model) if cfg.compile else model
    shape = (cfg.batch_size, 3, case["image_size"], case["image_size"])
    gen = torch.Generator(device=device).manual_seed(0)
    view1, view2 = (torch.randn(shape, device=device, generator=gen) for _ in range(2))
    labels = torch.randint(0, 10, (cfg.batch_size,), device=device, generator=gen)
    baseline = _memory_now(device)
    start, values = None, None
    for i in range(case["warmup"] + case["steps"]):
        if i == case["warmup"]:
            if i:
                values.tolist()  # the warm-up steps done on the device
            start = time.perf_counter()
        _, _, values = train_step(forward, optimizer, cfg, model.loss_dim, view1, view2, labels,
                                  model)
    values.tolist()  # the loop syncs once per log interval; this, once for the timed steps
    seconds = time.perf_counter() - start
    return {**case, "pairs_per_s": case["steps"] * cfg.batch_size / seconds,
            "step_peak_mb": (_memory_peak(device) - baseline) / 2**20, "data_wait": 0.0,
            "status": "ok"}


def _memory_now(device) -> int:
    """Bytes in use before the steps: the CUDA allocator's, or this process's resident set."""
    import torch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return common.rss_baseline()


def _memory_peak(device) -> int:
    """The peak since _memory_now: the allocator's, or the process's peak resident set."""
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return common.rss_peak()


def whole_loop(case: dict) -> dict:
    from directclr.train import pretrain
    with tempfile.TemporaryDirectory() as out:
        cfg = _config(case, case["data"], out)
        pretrain(cfg)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").open()]
    timed = [r for r in rows if "loss" in r][case["warmup"]:]
    seconds = sum(cfg.batch_size / r["pairs_per_s"] for r in timed)
    waited = sum(r["data_wait"] * cfg.batch_size / r["pairs_per_s"] for r in timed)
    return {**case, "pairs_per_s": len(timed) * cfg.batch_size / seconds,
            "data_wait": waited / seconds, "status": "ok"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="resnet18", choices=list(ARCHS))
    parser.add_argument("--mode", default="directclr")
    parser.add_argument("--dim", type=int, default=90, help="d0 (360 for resnet50)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data", default="fashion-mnist",
                        help="'fashion-mnist', 'synthetic' (JPEGs made under --jpegs), or a root")
    parser.add_argument("--jpegs", type=Path, default=Path("/tmp/directclr_bench_jpegs_train"))
    parser.add_argument("--loader", default="auto", choices=["auto", "dali", "torchvision"])
    parser.add_argument("--threads", type=int, default=2, help="loader threads / workers")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="also time the model alone with gradient caching at this "
                        "micro-batch, beside the plain step (time and peak-memory ratios)")
    parser.add_argument("--what", nargs="+", default=["model", "loop"], choices=["model", "loop"])
    parser.add_argument("--timeout", type=float, default=1800)
    args = common.parse_or_run_child(
        parser, argv, lambda case: (whole_loop if case["what"] == "loop" else model_alone)(case))
    if args is None:
        return []
    data = args.data
    if data == "synthetic" and "loop" in args.what:
        common.imagenet_like_jpegs(args.jpegs, SYNTHETIC_IMAGES)
        data = str(args.jpegs)
    rows = []
    for what in args.what:
        case = dict(what=what, device=args.device, arch=args.arch, mode=args.mode, dim=args.dim,
                    image_size=args.image_size, batch_size=args.batch_size, data=data,
                    loader=args.loader, threads=args.threads, warmup=args.warmup,
                    steps=args.steps, compile=args.compile)
        rows.append({"op": "train", **common.run_child(__file__, case, timeout=args.timeout)})
        print(json.dumps(rows[-1]), flush=True)
        if what == "model" and args.micro_batch:
            micro = {**case, "what": "model-micro", "micro_batch": args.micro_batch}
            rows.append({"op": "train", **common.run_child(__file__, micro,
                                                           timeout=args.timeout)})
            print(json.dumps(rows[-1]), flush=True)
    ok = {r["what"]: r for r in rows if r["status"] == "ok"}
    if "model" in ok and "loop" in ok:
        ok["loop"]["vs_model"] = ok["loop"]["pairs_per_s"] / ok["model"]["pairs_per_s"]
    if "model" in ok and "model-micro" in ok:  # same run, side by side: time and memory ratios
        plain, micro = ok["model"], ok["model-micro"]
        micro["time_vs_plain"] = plain["pairs_per_s"] / micro["pairs_per_s"]
        micro["memory_vs_plain"] = micro["step_peak_mb"] / plain["step_peak_mb"]
    rows = common.stamp(rows, args.device)
    path = common.append_rows(rows, "bench_train", args.results_dir)
    print(common.format_table(rows, ["what", "arch", "device", "image_size", "batch_size",
                                     "micro_batch", "loader", "pairs_per_s", "step_peak_mb",
                                     "data_wait", "vs_model", "time_vs_plain",
                                     "memory_vs_plain", "status"]))
    print(f"rows appended to {path}")
    return rows


if __name__ == "__main__":
    main()
