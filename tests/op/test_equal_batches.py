"""infonce's check that every rank passes the same N: an all-gather read on the host, so it runs
once per (N, process group) in each process, not on every step (2 gloo ranks)."""
import json

from tests.helpers import run_worker


def test_equal_batch_check_runs_once_per_batch_size_and_group(tmp_path):
    run_worker("equal_batches", tmp_path)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # One read (the gathered sizes) the first time, none after: the step is sync-free.
        assert record["first"] == 1 and record["again"] == [0, 0], record
        assert record["other_variant"] == 0, record  # the key is N and the group only
        assert record["new_n"] == 1 and record["new_n_again"] == 0, record
        assert record["new_group"] == 1 and record["new_group_again"] == 0, record
        for key in ("unequal", "unequal_again"):
            assert "same number of rows on every rank, got [7, 8] across 2 ranks" in record[key]
