"""Where a result came from: the git commit of the tree that produced it, and the CPU."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# Where results are written: appending to them does not make the code that wrote them dirty.
RESULT_DIRS = ("bench/results", "docs/results")


def git_commit(repo: Path = REPO) -> str:
    """Short commit hash, with "+dirty" when tracked files other than results differ from it;
    "unknown" outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, cwd=repo).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", *(f":(exclude){d}" for d in RESULT_DIRS)],
                               capture_output=True, text=True, cwd=repo).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name and core count, e.g. "AMD EPYC 7B13, 2 cores"."""
    model = platform.processor() or platform.machine() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"
