import os
import sys

# Triton kernels run on CPU tensors through the interpreter here; it must be set before triton
# is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property tests (tests/*/test_properties.py): CI's run is a fixed set of examples (derandomized,
# so no example database either) within its time budget; HYPOTHESIS_PROFILE=long searches more,
# randomly, keeping what fails in .hypothesis/ (git-ignored) to replay it first.
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """40 small JPEGs in 4 classes: the training tests' dataset."""
    from directclr.data import prepare_synthetic
    return prepare_synthetic(tmp_path_factory.mktemp("tiny"), n=40, classes=4, min_side=36,
                             max_side=60, progress=False)


@pytest.fixture(scope="session")
def one_process(tiny, tmp_path_factory):
    """The reference runs, one process with the whole batch, made once per mode for every test
    that compares a distributed run with it."""
    import subprocess

    from tests.helpers import ENV_ONE_THREAD, ddp_args
    runs = {}

    def run(mode):
        if mode not in runs:
            out = tmp_path_factory.mktemp(f"one-{mode}")
            subprocess.run([sys.executable] + ddp_args(tiny, mode) + ["--out", str(out)],
                           check=True, capture_output=True, timeout=600, env=ENV_ONE_THREAD)
            runs[mode] = out
        return runs[mode]
    return run
