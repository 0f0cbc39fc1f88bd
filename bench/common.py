"""Shared by the benchmarks: machine description, result rows, the printed table."""
from __future__ import annotations

import datetime
import json
import os
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
