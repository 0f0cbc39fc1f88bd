"""Shared by the benchmarks: machine description, result rows, the printed table."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from directclr.provenance import cpu_model, git_commit

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    return git_commit(RESULTS.parent.parent)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(device)
    return cpu_model()


def versions() -> dict:
    """The torch and Triton that produced a row (the GPU report's SASS depends on Triton's)."""
    import torch
    found = {"torch": torch.__version__}
    try:
        import triton
        found["triton"] = triton.__version__
    except ImportError:
        pass
    return found


def stamp(rows: list[dict], device: str) -> list[dict]:
    """Adds commit, date, machine and the torch/Triton versions to every row."""
    meta = {"commit": commit(), "date": datetime.date.today().isoformat(),
            "machine": machine(device), **versions()}
    return [{**row, **meta} for row in rows]


def append_rows(rows: list[dict], name: str, results_dir: Path = RESULTS) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.jsonl"
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def imagenet_like_jpegs(root: Path, n: int) -> Path:
    """`directclr prepare synthetic` JPEGs with ImageNet-like sides (300-500 px) in 10 class
    folders, made once under `root` (a .complete marker: an interrupted run starts over)."""
    if not (root / ".complete").exists():
        from directclr.data import prepare_synthetic
        prepare_synthetic(root, n, classes=10, min_side=300, max_side=500)
        (root / ".complete").touch()
    return root


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table; missing values print as '-'."""
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def rss_baseline() -> int:
    """This process's resident set now, its peak reset to it (Linux's clear_refs 5): what
    rss_peak() then reports came after, neither the imports before nor the parent that spawned
    this process (ru_maxrss keeps a vfork parent's resident set across exec)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not writable in some sandboxes: the peak then includes what came before
        pass
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def minor_faults() -> int:
    """Minor page faults of this process so far (pages first touched, or touched again after
    the allocator returned them to the system)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rss_peak() -> int:
    """The peak resident set since rss_baseline(), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def parse_or_run_child(parser: argparse.ArgumentParser, argv,
                       run_case) -> argparse.Namespace | None:
    """Adds --results-dir and run_child's hidden --child to a benchmark's parser and parses
    `argv`; in a child, prints the row of run_case(case) and returns None."""
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return None
    return args


def run_child(script: str, case: dict, timeout: float, env: dict | None = None) -> dict:
    """Runs `script --child <case as JSON>` in a fresh interpreter (with `env` added to this
    one's environment); its last stdout line is the result row. Failures and timeouts come back
    as rows with a status instead of raising."""
    cmd = [sys.executable, script, "--child", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env} if env else None)
    except subprocess.TimeoutExpired:
        return {**case, "status": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {**case, "status": f"failed (rc {proc.returncode}): {last[:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])
