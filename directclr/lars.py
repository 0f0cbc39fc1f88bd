"""LARS (You et al. 2017) as the official DirectCLR / Barlow Twins code uses it."""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each parameter tensor is rescaled by a trust ratio
    eta * |w| / |g + wd w|. One-dimensional parameters (biases, norm scales and shifts) get
    neither weight decay nor the trust ratio, as in the official recipe.

    Defaults follow the recipe: momentum 0.9, trust coefficient 0.001, weight decay 1e-6.
    """

    def __init__(self, params, lr: float, weight_decay: float = 1e-6, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum),
                            ("trust_coefficient", trust_coefficient)):
            if not (value >= 0.0):  # also rejects NaN
                raise ValueError(f"{name} must be >= 0, got {value}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(update)
                    # A zero weight or update keeps the plain step (ratio 1), as the official code.
                    ratio = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["trust_coefficient"] * param_norm / update_norm,
                                        torch.ones_like(param_norm))
                    update = update.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                p.add_(buffer, alpha=-group["lr"])
        return loss
