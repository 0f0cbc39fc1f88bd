"""The fault campaign (bench/faults.py), each case a test: signals, divergence, config drift,
bit-rot, malformed and unreadable checkpoints, a full disk, a locked or littered --out."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import faults  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One folder for the module: the straight runs the cases compare with are made once."""
    return tmp_path_factory.mktemp("faults")


@pytest.mark.parametrize("name", list(faults.CASES))
def test_fault(work, name):
    if "dali" in name:
        pytest.importorskip("nvidia.dali")
    tried, run_case = faults.CASES[name]
    print(f"{name}: {tried}\n  -> {run_case(work)}")
