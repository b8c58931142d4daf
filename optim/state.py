"""What every update rule here shares: optimizer state in its own dtype (float32 statistics for bf16/fp16
weights survive a checkpoint), and one parameter stepped at a time (`ParamwiseOptimizer`)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import chain

import torch
from torch import Tensor


def check_betas(betas) -> None:
    """The one check of an Adam-style (β₁, β₂) pair: two numbers in [0, 1)."""
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {tuple(betas)}")


def state_dtype(p: Tensor) -> torch.dtype:
    """The dtype of a parameter's optimizer statistics: float64 for float64 weights, else float32."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def restore_saved_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """After `Optimizer.load_state_dict` (which casts every floating state tensor to its parameter's
    dtype), put back the dtypes that were saved: float32 statistics of bf16 weights stay float32."""
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    for i, p in zip(saved_ids, params):
        for key, value in state_dict["state"].get(i, {}).items():
            device = value.device if key == "step" else p.device  # the step count stays on the CPU
            optimizer.state[p][key] = value.to(device, copy=True)


class ParamwiseOptimizer(torch.optim.Optimizer):
    """A torch Optimizer whose update is one parameter at a time, `step_param(p, group)` from p.grad: `step()`
    runs the closure (with gradients enabled) and then steps every parameter that has a gradient; per-layer
    updates (`optim.per_layer`) call `step_param` inside backward. Loading a state dict keeps the saved dtypes."""

    def step_param(self, p: Tensor, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        restore_saved_dtypes(self, state_dict)


class CurvatureOptimizer(ParamwiseOptimizer):
    """A ParamwiseOptimizer that folds a diagonal curvature estimate ĥ (optim.curvature) into its state
    every k steps: `update_hessian(estimates)`, then `step()` from the gradients as usual."""

    @torch.no_grad()
    def update_hessian(self, estimates: Mapping[Tensor, Tensor]) -> None:
        """Fold the estimate of every parameter that `estimates` maps (a distributor passes those of the
        blocks this rank owns); the others keep their state."""
        for group in self.param_groups:
            for p in group["params"]:
                if p in estimates:
                    self.fold_estimate(p, group, estimates[p])

    def fold_estimate(self, p: Tensor, group: dict, estimate: Tensor) -> None:
        raise NotImplementedError
