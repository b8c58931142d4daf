"""AdaHessian (Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney; AAAI 2021, "ADAHESSIAN: An Adaptive Second
Order Optimizer for Machine Learning", Eqs. 8-10 and Algorithm 1): Adam with the second moment of a
Hutchinson Hessian diagonal in place of the squared gradient.

    `update_hessian`:  D = spatial average of |ĥ| over blocks of `block_size` contiguous entries
    every step:        m ← β₁ m + (1 − β₁) g,      v ← β₂ v + (1 − β₂) D²
                       θ ← θ − lr · ( m̂ / ((√v̂)^k + ε) + wd · θ ),   m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ), k = hessian_power

ĥ = u ⊙ (H u) comes from the estimator pass (`optim.curvature.hutchinson_diag`) through `update_hessian`. The
official code estimates D at every step; with an estimate every k steps the last D is reused. The
official weight decay is lr/(1−β₁ᵗ) · wd · θ (inside its bias-corrected step size); here it is the
paper's lr · wd · θ. With D = |g| this is exactly Adam.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .curvature import block_average
from .rounding import write_weight_
from .state import CurvatureOptimizer, check_betas, state_dtype


class AdaHessian(CurvatureOptimizer):
    """AdaHessian (module docstring). Call `update_hessian(estimates)` with Hutchinson estimates before
    the first `step()` and then whenever a new estimate is due."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        block_size: int = 32,
    ):
        if not lr >= 0 or eps < 0 or weight_decay < 0 or not 0 < hessian_power <= 1:
            raise ValueError(f"need lr ≥ 0, eps ≥ 0, weight_decay ≥ 0, 0 < hessian_power ≤ 1; got {lr}, {eps}, {weight_decay}, {hessian_power}")
        check_betas(betas)
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      hessian_power=hessian_power, block_size=block_size))

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            dtype = state_dtype(p)
            state.update(
                step=torch.tensor(0, dtype=torch.int64),
                exp_avg=torch.zeros_like(p, dtype=dtype),
                exp_hessian_diag_sq=torch.zeros_like(p, dtype=dtype),
                hessian_diag=torch.zeros_like(p, dtype=dtype),
            )
        return state

    def fold_estimate(self, p: Tensor, group: dict, estimate: Tensor) -> None:
        """D ← block average of |ĥ|."""
        d = self._state(p)["hessian_diag"]
        d.copy_(block_average(estimate.to(d.dtype).abs(), group["block_size"]))

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict) -> None:
        """The update of one parameter of `group` from p.grad and its last Hessian diagonal D."""
        state = self.state[p]
        if not state:
            raise RuntimeError("AdaHessian.step before any update_hessian(estimates): there is no Hessian estimate yet")
        state["step"] += 1
        step = int(state["step"])
        (beta1, beta2), k = group["betas"], group["hessian_power"]
        m, v, d = state["exp_avg"], state["exp_hessian_diag_sq"], state["hessian_diag"]
        m.lerp_(p.grad.to(m.dtype), 1 - beta1)
        v.mul_(beta2).addcmul_(d, d, value=1 - beta2)
        denom = (v / (1 - beta2**step)).sqrt_().pow_(k).add_(group["eps"])
        update = m.div(denom).div_(1 - beta1**step)
        w = p.to(m.dtype)  # p itself for float32/float64 weights
        w.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
        write_weight_(p, w)  # stochastic rounding into bf16 weights

    def state_numel(self, p: Tensor, group: dict) -> int:
        """Elements of state per parameter (m, v and D): the cost model of block ownership."""
        return 3 * p.numel()

