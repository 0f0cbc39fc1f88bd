"""Run under torchrun by test_equal_batches.py (gloo): how many host reads each call of infonce
makes, i.e. whether it ran the equal-batch check. Every rank writes rank<r>.json."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from directclr import infonce
from directclr.cli import exit_without_teardown
from tests.helpers import count_host_reads


def host_reads(n, group=None, variant="cross"):
    """Host reads of one forward and backward at n rows per rank."""
    z1 = torch.randn(n, 8, requires_grad=True)
    z2 = torch.randn(n, 8)
    with count_host_reads() as reads:
        infonce(z1, z2, dim=8, variant=variant, group=group).backward()
    return sum(reads.values())


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    record = {"first": host_reads(4), "again": [host_reads(4), host_reads(4)],
              "other_variant": host_reads(4, variant="ntxent"),
              "new_n": host_reads(6), "new_n_again": host_reads(6)}
    group = dist.new_group([0, 1])
    record["new_group"], record["new_group_again"] = host_reads(4, group), host_reads(4, group)
    try:
        host_reads(7 + rank)  # both ranks at an N new to them, unequal
        record["unequal"] = None
    except ValueError as e:
        record["unequal"] = str(e)
    record["unequal_again"] = None
    try:
        host_reads(7 + rank)  # a failed check caches nothing
    except ValueError as e:
        record["unequal_again"] = str(e)
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()  # every rank done before any tears gloo down
    dist.destroy_process_group()
    # torch can abort a gloo process in the interpreter's teardown (see exit_without_teardown);
    # one of ~25 loaded runs of this worker failed, its output not kept. As loss_ddp.py does.
    exit_without_teardown()


if __name__ == "__main__":
    main()
