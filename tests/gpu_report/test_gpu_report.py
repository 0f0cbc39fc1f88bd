"""The GPU kernels' budgets, judged on this CPU by the static report (directclr.gpu_report).

One run of the report compiles every kernel, in the specialization the JIT builds for real
calls, for sm_90a and sm_80, reads its SASS, and counts its work under the interpreter; these
tests fail when a change spills registers, narrows the operand loads, leaves the tensor cores,
duplicates tensor work across warpgroups, adds passes over the logits, or makes the estimated
H200 time worse than the budget against eager PyTorch.
"""
import json
import os
import subprocess
import sys

import pytest

from directclr.gpu_report.census import loops, parse_sass, tile_census
from directclr.gpu_report.report import CASES
from tests.helpers import ROOT

# Max dynamic shared memory per block: H100/H200 (sm_90) 227 KiB, A100 (sm_80) 163 KiB.
SHARED_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}
TENSOR_KINDS = ("bf16", "tf32")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "gpu_static.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "directclr.gpu_report", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=2400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def _kernels(rows, arch):
    for row in rows:
        if row["arch"] == arch:
            for kernel in row["kernels"]:
                if kernel["kernel"] != "cublas_mm":
                    yield row, kernel


def test_every_case_and_arch_is_reported(rows):
    expected = {f"{v}:{d}:{t}" for v, d, t in CASES} | {"covariance:2048:bfloat16"}
    for arch in SHARED_LIMIT:
        assert {r["case"] for r in rows if r["arch"] == arch} == expected
    kernels = {k["kernel"] for _, k in _kernels(rows, "sm_90a")}
    assert kernels == {"_forward_kernel", "_backward_kernel", "_g_panel_kernel",
                       "_centered_gram_kernel"}


@pytest.mark.parametrize("arch", list(SHARED_LIMIT))
def test_no_spills_and_shared_memory_fits(rows, arch):
    for row, k in _kernels(rows, arch):
        where = (row["case"], row["precision"], k["kernel"])
        assert k["spill_store_bytes"] == 0 and k["spill_load_bytes"] == 0, where
        assert k["stack_bytes"] == 0, where
        assert 0 < k["shared_bytes"] <= SHARED_LIMIT[arch], where


def test_operands_arrive_in_16_byte_loads_on_sm90(rows):
    for row, k in _kernels(rows, "sm_90a"):
        assert k["operand_loads_16B"], (row["case"], row["precision"], k["kernel"],
                                        k["tile_loads"])


def test_tensor_cores_issue_budget_and_no_duplicated_work_on_sm90(rows):
    """wgmma on every tensor-core case; in every pass the issued instructions per logit stay
    within 1.5x the tensor-core clocks per logit; the multiply-adds the SASS issues equal the
    ones tl.dot asks for (warpgroups never compute the same rows twice)."""
    for row, k in _kernels(rows, "sm_90a"):
        # The budgets' cases: bf16 and fp32 (TF32). fp16 is reported beside them.
        if k["kernel"] == "_centered_gram_kernel" or k["tensor_kind"] not in TENSOR_KINDS or \
                row["dtype"] == "float16":
            continue
        where = (row["case"], row["precision"], k["kernel"])
        assert k["wgmma"], where
        assert k["issue_over_tensor"] <= 1.5, (where, k["issue_over_tensor"])
    for row in rows:
        if row["arch"] == "sm_90a" and row.get("interpreter") and \
                (row["dtype"] != "float32" or row["precision"] == "tf32"):
            sass, interp = row["sass_gemm_equivalents"], row["interpreter"]["gemm_equivalents"]
            assert abs(sass - interp) <= 0.02 * interp, (row["case"], sass, interp)
    for row, k in _kernels(rows, "sm_80"):
        assert not k["wgmma"], (row["case"], k["kernel"])


def test_work_per_forward_backward(rows):
    """GEMM-equivalents (1 = the problem's logits product) and exp2s per logit, counted under
    the interpreter with the GPU tile configurations."""
    counts = {r["case"]: r["interpreter"] for r in rows if r.get("interpreter")}
    budgets = {"cross:360:bfloat16": 6.5, "ntxent:360:bfloat16": 3.3, "cross:2048:bfloat16": 7}
    for case, budget in budgets.items():
        assert counts[case]["gemm_equivalents"] <= budget, (case, counts[case])
    for case, count in counts.items():
        if case.startswith("cross"):
            assert count["exp2_per_logit"] <= 6, (case, count)


def test_estimated_h200_time_against_eager(rows):
    for case in ("cross:360:bfloat16", "ntxent:360:bfloat16"):
        row = next(r for r in rows if r["case"] == case and r["arch"] == "sm_90a")
        assert row["estimate"]["fused_over_eager"] <= 0.65, (case, row["estimate"])


def test_sass_census_reads_loops_shapes_and_serialization():
    """The census on a hand-written SASS listing: a K loop of 2 HGMMAs per trip inside a tile
    loop, one serialized HGMMA, a 16-byte cp.async, a 4-byte load and an edge-tile if body."""
    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MUFU.EX2 R2, R3 ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R4], desc[UR4][R6.64] ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0060*/               @P0 BRA 0x20 ;
        /*0070*/              @!P2 BRA 0x90 ;
        /*0080*/                   FSEL R2, R2, RZ, P3 ;
        /*0090*/                   LDG.E R8, desc[UR4][R10.64] ;
        /*00a0*/                   MUFU.EX2 R2, R3 ;
        /*00b0*/               @P1 BRA 0x10 ;
        /*00c0*/                   EXIT ;
    """
    code = parse_sass(listing)
    assert loops(code) == [(2, 6), (1, 11)]
    counted = tile_census(code, num_warps=8, k_steps=4)
    assert counted["k_loop_trips"] == 4
    assert counted["tile_macs"] == 4 * 2 * 64 * 128 * 16 * 2  # trips x HGMMAs x shape x groups
    assert counted["serialized_tensor_instructions"] == 1
    assert counted["tile_wide_load_bytes"] == 4 * 16 * 256
    assert counted["tile_narrow_load_bytes"] == 4 * 256
    assert counted["tile_exp2"] == 2
    assert counted["tile_instructions_all_paths"] == 5 * 4 + 6  # the K loop's 5 run 4 times
    assert counted["tile_instructions"] == 5 * 4 + 5  # interior tiles skip the FSEL
