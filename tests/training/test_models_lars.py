"""LARS against a hand-computed step, and the backbones/projectors of each mode."""
import pytest
import torch
import torchvision

from directclr.lars import LARS
from directclr.models import MODES, build_backbone, build_projector


def test_lars_step_matches_hand_computation():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    weight.grad = torch.tensor([[0.0, 1.0]])
    bias.grad = torch.tensor([2.0])
    opt = LARS([weight, bias], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    opt.step()
    update = torch.tensor([[0.3, 1.4]])  # g + wd w
    ratio = 0.01 * 5.0 / update.norm()
    assert torch.allclose(weight, torch.tensor([[3.0, 4.0]]) - 0.5 * ratio * update)
    assert torch.allclose(bias, torch.tensor([1.0 - 0.5 * 2.0]))  # 1-D: no decay, no ratio
    # Second step: momentum buffer = 0.9 * previous + new update.
    before = weight.detach().clone()
    weight.grad = torch.tensor([[0.0, 1.0]])
    bias.grad = torch.tensor([0.0])
    opt.step()
    update2 = torch.tensor([[0.0, 1.0]]) + 0.1 * before
    buffer = 0.9 * ratio * update + 0.01 * before.norm() / update2.norm() * update2
    assert torch.allclose(weight, before - 0.5 * buffer, atol=1e-7)
    assert torch.allclose(bias, torch.tensor([0.0 - 0.5 * 0.9 * 2.0]))


def test_lars_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="lr"):
        LARS([torch.nn.Parameter(torch.ones(2, 2))], lr=-1.0)


@pytest.mark.parametrize("mode", MODES)
def test_modes_build_and_run(mode):
    backbone, width = build_backbone("resnet18", small_images=True)
    projector, dim = build_projector(mode, width, 90)
    r = backbone(torch.randn(4, 3, 32, 32))
    z = projector(r)
    assert r.shape == (4, 512)
    assert z.shape[0] == 4 and (dim is None or dim <= z.shape[1])
    trainable = [p for p in projector.parameters() if p.requires_grad]
    assert (len(trainable) == 0) == (mode in ("directclr", "simclr-none", "fixed-lowrank"))


def test_backbone_state_dict_loads_into_torchvision():
    backbone, _ = build_backbone("resnet50")
    missing, unexpected = torchvision.models.resnet50().load_state_dict(
        backbone.state_dict(), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []


def test_zero_init_residual():
    backbone, _ = build_backbone("resnet18")
    assert all(block.bn2.weight.abs().sum() == 0 for block in backbone.layer1)


@pytest.mark.parametrize("width, out", [(2048, 128), (128, 8)])
def test_simclr_projectors_have_the_official_shapes(width, out):
    """Official DirectCLR code: MLP = Linear(w, w, no bias), BN(w), ReLU, Linear(w, out, no
    bias), BN(out); linear = Linear(w, out, no bias)."""
    mlp, loss_dim = build_projector("simclr-mlp", width, dim=22, simclr_out=out)
    assert loss_dim is None
    kinds = [type(layer) for layer in mlp]
    assert kinds == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear,
                     torch.nn.BatchNorm1d]
    assert (mlp[0].in_features, mlp[0].out_features) == (width, width) and mlp[0].bias is None
    assert (mlp[3].in_features, mlp[3].out_features) == (width, out) and mlp[3].bias is None
    assert mlp[1].num_features == width and mlp[4].num_features == out
    linear, _ = build_projector("simclr-linear", width, dim=22, simclr_out=out)
    assert isinstance(linear, torch.nn.Linear) and linear.bias is None
    assert (linear.in_features, linear.out_features) == (width, out)
    assert linear(torch.randn(4, width)).shape == (4, out)
    assert build_projector("simclr-mlp", width, dim=22)[0][3].out_features == 128  # default


def test_fixed_lowrank_has_the_asked_rank():
    from directclr.models import FixedLowRank
    head = FixedLowRank(64, 10)
    assert torch.linalg.matrix_rank(head.weight).item() == 10


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_cpu_sync_batchnorm_equals_batchnorm_on_one_rank(one_rank_group, momentum):
    """Forward, input and affine gradients and running statistics match nn.BatchNorm2d (the
    2-rank case is the DDP test in test_train.py)."""
    from directclr.models import CpuSyncBatchNorm
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(6, momentum=momentum)
    synced = CpuSyncBatchNorm(6, momentum=momentum)
    with torch.no_grad():
        for bn in (reference, synced):
            bn.weight.copy_(torch.linspace(0.5, 2, 6))
            bn.bias.copy_(torch.linspace(-1, 1, 6))
    x = (3 * torch.randn(5, 6, 4, 4) + 2).requires_grad_()
    upstream = torch.randn(5, 6, 4, 4)
    grads = []
    for bn in (reference, synced):
        for _ in range(2):  # twice: the running statistics' update rule, not just its first step
            out = bn(x)
        (grad_x, grad_w, grad_b) = torch.autograd.grad((out * upstream).sum(),
                                                       (x, bn.weight, bn.bias))
        grads.append((out.detach(), grad_x, grad_w, grad_b))
    for got, expected in zip(grads[1], grads[0]):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(synced, name).float(), getattr(reference, name).float(),
                              rtol=1e-5, atol=1e-6), name
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        synced(torch.randn(1, 6))
