"""World 2 x N/2 (torchrun, gloo) gives the loss and gradients of 1 x N."""
import pytest
import torch

from directclr import infonce
from directclr.fused import KEEP_DOTS_ENV
from tests.helpers import assert_rel_close, run_worker
from tests.op.conftest import PATH_BUDGETS
from tests.workers.loss_ddp import DIM, IN_FEATURES, WIDTH


# "triton": the GPU kernels under the interpreter (conftest's TRITON_INTERPRET=1 reaches the
# workers), with rank 1's positives and excluded columns off the main diagonal.
@pytest.mark.parametrize("backend,path", [("auto", "keep"), ("auto", "recompute"),
                                          ("triton", "recompute")])
def test_two_process_gloo_matches_single_process(tmp_path, backend, path, monkeypatch):
    monkeypatch.setenv(KEEP_DOTS_ENV, PATH_BUDGETS[path])  # the workers' CPU op, and this one
    out = tmp_path / "dist.pt"
    run_worker("loss_ddp", "--out", out, "--backend", backend)
    saved = torch.load(out, weights_only=True)
    world = saved["world"]
    assert world == 2
    for variant, got in saved["results"].items():
        model = torch.nn.Linear(IN_FEATURES, WIDTH)
        model.load_state_dict(saved["base"])
        loss = infonce(model(saved["x1"]), model(saved["x2"]), dim=DIM, variant=variant)
        loss.backward()
        z1 = model(saved["x1"]).detach().requires_grad_()
        z2 = model(saved["x2"]).detach().requires_grad_()
        infonce(z1, z2, dim=DIM, variant=variant).backward()
        # Each rank returns the mean over its own rows: their mean is the global loss.
        assert_rel_close(got["loss_per_rank"].mean(), loss.detach(), 1e-5, f"{variant} loss")
        assert_rel_close(got["weight_grad"], model.weight.grad, 1e-5, f"{variant} weight grad")
        assert_rel_close(got["bias_grad"], model.bias.grad, 1e-5, f"{variant} bias grad")
        # Each rank's embedding gradient is that of the sum of all ranks' losses, so that DDP's
        # average over `world` ranks is the global gradient.
        assert_rel_close(got["z1_grad"] / world, z1.grad, 1e-5, f"{variant} z1 grad")
