"""The GPU kernels' budgets, judged on this CPU by the static report (directclr.gpu_report).

One run of the report compiles every kernel, in the specialization the JIT builds for real
calls, for sm_90a and sm_80, reads its SASS, and counts its work under the interpreter; these
tests fail when a change spills registers, narrows the operand loads, leaves the tensor cores,
duplicates tensor work across warpgroups, adds passes over the logits, or makes the estimated
H200 time worse than the budget against eager PyTorch. The same run compiles the reference
kernels (published Hopper timings): the cost model must predict each within 0.8-1.25 of its
measured time, with the constants its own fit returns.
"""
import json
import os
import subprocess
import sys

import pytest

from directclr.gpu_report import cost
from directclr.gpu_report.census import loops, parse_sass, tile_census
from directclr.gpu_report.references import FIT_GRID, REFERENCES, fit, residuals
from directclr.gpu_report.report import CASES, ESTIMATE_NS, band
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


def _cases(rows):
    return [row for row in rows if row.get("kind") != "reference"]


def _references(rows):
    return [row for row in rows if row.get("kind") == "reference"]


def _kernels(rows, arch):
    for row in _cases(rows):
        if row["arch"] == arch:
            for kernel in row["kernels"]:
                if kernel["kernel"] != "cublas_mm":
                    yield row, kernel


def test_every_case_and_arch_is_reported(rows):
    expected = {f"{v}:{d}:{t}" for v, d, t in CASES} | {"covariance:2048:bfloat16"}
    for arch in SHARED_LIMIT:
        assert {r["case"] for r in _cases(rows) if r["arch"] == arch} == expected
    assert len(_references(rows)) == len(REFERENCES)
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
    for row in _cases(rows):
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
    """The budget in calibrated terms: at dim 360 and N = 65,536 the fused op's estimate is at
    most 0.65 of eager PyTorch's (0.39 cross, 0.48 ntxent when calibrated: room for the model's
    spread on the references, 0.84-1.14, before the budget fails)."""
    for case in ("cross:360:bfloat16", "ntxent:360:bfloat16"):
        row = next(r for r in _cases(rows) if r["case"] == case and r["arch"] == "sm_90a")
        assert row["estimate"]["fused_over_eager"] <= 0.65, (case, row["estimate"])


def test_references_are_predicted_within_band_by_the_fitted_constants(rows):
    """Every reference within 0.8-1.25 of its published time, and the constants in use are
    the fit's (within one step of its grid): a change to the census or the model that moves
    the fit fails here until the constants and docs are refitted."""
    references = _references(rows)
    for r in residuals(references):
        assert 0.8 <= r["ratio"] <= 1.25, r
    best = fit(references)
    for name, grid in FIT_GRID.items():
        step = grid[1] - grid[0]
        assert abs(getattr(best, name) - getattr(cost.CALIBRATED, name)) <= step * 1.01, \
            (name, best, cost.CALIBRATED)


def test_estimates_are_bands_at_three_n(rows):
    """Every sm_90a bf16 case: fused, eager and compiled-like estimates at each of ESTIMATE_NS,
    each a band around its point that holds the references' spread, growing with N."""
    spread = [r["ratio"] for r in residuals(_references(rows))]
    cases = [r for r in _cases(rows) if r["arch"] == "sm_90a" and r["dtype"] == "bfloat16"
             and r["variant"] != "covariance"]
    assert len(cases) == sum(dtype == "bfloat16" for _, _, dtype in CASES)
    for row in cases:
        assert [e["n"] for e in row["estimates"]] == list(ESTIMATE_NS), row["case"]
        for provider in ("fused", "eager", "compiled"):
            times = [e[provider] for e in row["estimates"]]
            for t in times:
                assert t["low_s"] * max(spread) == pytest.approx(t["seconds"])
                assert t["high_s"] * min(spread) == pytest.approx(t["seconds"])
            assert all(a["seconds"] < b["seconds"] for a, b in zip(times, times[1:]))


def test_band_divides_by_the_spread():
    low, high = band([{"seconds": 2.0}, {"seconds": 1.0}], (0.75, 1.5))
    assert (low, high) == (2.0, 4.0)


def test_programs_per_sm_takes_the_tightest_limit():
    assert cost.programs_per_sm(255, 8, 96 * 1024) == 1  # registers: 256 x 256 threads
    assert cost.programs_per_sm(64, 4, 0) == 8  # registers: 64 x 128 threads
    assert cost.programs_per_sm(32, 4, 100 * 1024) == 2  # shared memory, 1 KiB reserved each
    assert cost.programs_per_sm(16, 32, 0) == 2  # warps: 64 per SM


def test_slot_tiles_schedules_programs_as_slots_free():
    """Equal programs fill whole waves; uneven ones go to the first free slot (a last wave of
    small programs costs what they do, not a full program's time)."""
    assert cost.slot_tiles([4] * 7, 3) == (4 * 3 * 3, 3)
    assert cost.slot_tiles([4, 4, 4, 1], 3) == (5 * 3, 2)


def _kernel_row(tensor, issue, exp2, hbm_bytes=0, waves=1, pipelined=False):
    return {"kernel": "k", "tile_clocks": {"tensor": tensor, "smem": 0.0, "issue": issue,
                                            "exp2": exp2},
            "slot_tiles": 132, "tiles": 132, "waves": waves, "hbm_bytes": hbm_bytes,
            "launches": 1, "pipelined": pipelined}


def test_tensor_issue_and_exp2_time_add_and_hbm_bounds_them():
    """The calibrated form: one tile per SM costs tensor / efficiency + issue + exp2 clocks
    (the tutorials' kernels fit a sum, not a max), or its HBM traffic if that is longer; a
    pipelined program pays the fill once per wave."""
    cal = cost.Calibration(tensor_efficiency=0.5, hbm_efficiency=0.5, cublas_efficiency=1.0,
                           launch_s=1e-6, fill_s=2e-6)
    gpu = cost.H200
    seconds = cost.triton_seconds(_kernel_row(100.0, 50.0, 10.0), gpu, cal)
    assert seconds["compute_s"] == pytest.approx((100 / 0.5 + 50 + 10) / gpu.clock_hz)
    assert seconds["seconds"] == pytest.approx(1e-6 + seconds["compute_s"])
    heavy = cost.triton_seconds(_kernel_row(100.0, 50.0, 10.0, hbm_bytes=1e9), gpu, cal)
    assert heavy["bound"] == "memory"
    assert heavy["seconds"] == pytest.approx(1e-6 + 1e9 / (0.5 * gpu.hbm_bytes_per_s))
    filled = cost.triton_seconds(_kernel_row(100.0, 50.0, 10.0, waves=3, pipelined=True), gpu,
                                 cal)
    assert filled["seconds"] == pytest.approx(seconds["seconds"] + 3 * 2e-6)


def test_cublas_runs_in_waves_of_its_tiles_and_splits_small_outputs():
    """3072^2 in 128 x 256 tiles: 288 tiles, 3 waves of 132 (the published 585 TFLOP/s, 0.59
    of the peak); an output of 32 tiles is split along K over the SMs instead."""
    cal = cost.CALIBRATED
    full = cost.cublas_seconds(8192, 8192, 8192, 2, cost.H100_SXM, cal)["compute_s"]
    waves = cost.cublas_seconds(3072, 3072, 3072, 2, cost.H100_SXM, cal)["compute_s"]
    per_mac = lambda s, m: s / m**3  # noqa: E731
    assert per_mac(waves, 3072) / per_mac(full, 8192) == pytest.approx(
        (3 * 132 / 288) / (16 * 132 / 2048))
    skinny = cost.cublas_seconds(2048, 65536, 256, 2, cost.H200, cal)["compute_s"]
    assert skinny == pytest.approx(2048 * 65536 * 256 / (
        cost.TENSOR_MACS_PER_CLOCK["bf16"] * 132 * cost.H200.clock_hz * cal.cublas_efficiency))


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
