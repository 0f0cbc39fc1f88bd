"""Every Triton configuration autotune can pick compiles for Hopper and Ampere without a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("compile_kernels.py")
# Max dynamic shared memory per block: H100/H200 (sm_90) 227 KiB, A100 (sm_80) 163 KiB.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def test_all_configurations_compile_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          env=env, timeout=1200, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["kernel"] for r in rows} == {"_lse_kernel", "_grad_kernel", "_centered_gram_kernel"}
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        assert 0 < r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], r
        assert r["cubin_bytes"] > 0, r
        # The covariance kernel computes in IEEE fp32 on purpose (TF32 swamps small eigenvalues).
        tensor_core = r["kernel"] != "_centered_gram_kernel" and (
            r["dtype"] != "float32" or r["precision"] == "tf32")
        if r["arch"] == 90 and tensor_core:
            assert r["wgmma"], f"sm_90 PTX without wgmma: {r}"
        if r["arch"] == 80:
            assert not r["wgmma"], r
