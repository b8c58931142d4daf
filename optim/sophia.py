"""Sophia: second-order clipped stochastic optimization (Liu, Li, Hall, Liang, Ma; ICLR 2024, "Sophia: A
Scalable Stochastic Second-order Optimizer for Language Model Pre-training", Algorithm 3).

    every step:        m ← β₁ m + (1 − β₁) g
                       θ ← θ − lr · wd · θ                                  (decoupled weight decay)
                       θ ← θ − lr · clip(m / max(ρ · h, ε), 1)              (elementwise, both sides)
    every k steps:     h ← β₂ h + (1 − β₂) ĥ                                (`update_hessian`)

ĥ is a diagonal curvature estimate of the estimator pass (`optim.curvature`), handed to `update_hessian`: Sophia-G
uses Gauss-Newton-Bartlett, ĥ = B · ĝ ⊙ ĝ; Sophia-H uses Hutchinson, ĥ = u ⊙ (H u). The official code
leaves ĝ itself in `.grad`, squares it in `update_hessian` and multiplies by the batch size B in `step`
(min(|m| / (ρ · B · h + 1e-15), 1)); with B inside the estimate the two agree, and one `update_hessian`
serves both estimators. clip(z, 1) = max(min(z, 1), −1) is two-sided, as in the paper: a Hutchinson
estimate u ⊙ (Hu) is negative where the loss is locally concave, so h can be negative; there the
denominator is ε and the coordinate takes a sign step of lr (the official code's one-sided
min(|m| / (ρh + ε), 1) would divide by a negative number and move it by an unbounded amount, uphill).
So no coordinate moves by more than lr per step besides the decay, whatever the sign of h. The
fraction of coordinates that were not clipped (|m| < max(ρh, ε)) is the "win rate" the paper asks to
keep in 0.1-0.5; `metrics()` reports it.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .rounding import write_weight_
from .state import CurvatureOptimizer, check_betas, state_dtype


class Sophia(CurvatureOptimizer):
    """Sophia (module docstring). Call `update_hessian(estimates)` with the curvature estimates every k
    steps; `step()` with the gradient in `.grad` every step."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-15,
    ):
        if not lr >= 0 or not rho > 0 or weight_decay < 0 or not eps > 0:
            raise ValueError(f"need lr ≥ 0, rho > 0, weight_decay ≥ 0, eps > 0; got {lr}, {rho}, {weight_decay}, {eps}")
        check_betas(betas)
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps))

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            dtype = state_dtype(p)
            state.update(
                step=torch.tensor(0, dtype=torch.int64),
                exp_avg=torch.zeros_like(p, dtype=dtype),
                hessian=torch.zeros_like(p, dtype=dtype),
                unclipped=torch.zeros((), dtype=torch.int64, device=p.device),
            )
        return state

    def fold_estimate(self, p: Tensor, group: dict, estimate: Tensor) -> None:
        """h ← β₂ h + (1 − β₂) ĥ."""
        self._state(p)["hessian"].mul_(group["betas"][1]).add_(estimate, alpha=1 - group["betas"][1])

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict) -> None:
        """The update of one parameter of `group` from p.grad."""
        state = self._state(p)
        state["step"] += 1
        exp_avg = state["exp_avg"]
        exp_avg.lerp_(p.grad.to(exp_avg.dtype), 1 - group["betas"][0])
        ratio = exp_avg / (state["hessian"] * group["rho"]).clamp_(min=group["eps"])
        state["unclipped"] = (ratio.abs() < 1).sum()
        w = p.to(exp_avg.dtype)  # p itself for float32/float64 weights
        w.mul_(1 - group["lr"] * group["weight_decay"]).add_(ratio.clamp_(-1, 1), alpha=-group["lr"])
        write_weight_(p, w)  # stochastic rounding into bf16 weights

    def metrics(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{"win_rate": (unclipped coordinates, coordinates)} of the last step, summed over this
        optimizer's parameters (sums, so that shards can be added up across workers)."""
        pairs = [(s["unclipped"], s["exp_avg"].numel()) for s in self.state.values() if "unclipped" in s]
        # on the parameters' device, no copy per parameter: the loop gathers all metrics at its log interval
        unclipped = torch.stack([u for u, _ in pairs]).sum(dtype=torch.float64) if pairs else torch.zeros((), dtype=torch.float64)
        return {"win_rate": (unclipped, torch.tensor(float(sum(n for _, n in pairs)), dtype=torch.float64))}

    def state_numel(self, p: Tensor, group: dict) -> int:
        """Elements of state per parameter (m and h): the cost model of block ownership."""
        return 2 * p.numel()

