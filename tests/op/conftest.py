import pytest

from directclr.fused import KEEP_DOTS_ENV

# Budgets (MiB) that send every shape of these tests down one path of the CPU op: "recompute"
# keeps nothing (each backward tile is a product again), "keep" keeps the forward's dots.
PATH_BUDGETS = {"recompute": "0", "keep": "1e9"}


@pytest.fixture(params=sorted(PATH_BUDGETS))
def dots_path(request, monkeypatch):
    """Runs the test once on each path of the CPU op (fused.keeps_dots); the environment reaches
    the workers a test starts."""
    monkeypatch.setenv(KEEP_DOTS_ENV, PATH_BUDGETS[request.param])
    return request.param
