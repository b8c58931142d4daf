"""Is the run still training? Non-finite losses, gradient norms and weights, and DeepSpeed's skipped steps.

The hot loop never waits for the host: `Health.observe` folds each step's verdict into a device tensor
(the first step whose loss or applied gradient norm was not finite), and `Health.problem` reads it with
one scalar all-reduce where the loop syncs anyway (at the log interval, and before a checkpoint is
sealed, when the weights themselves are checked too). Every rank reaches the same verdict at the same
step, so all of them stop together (`Diverged`) and no non-finite checkpoint is ever sealed.

DeepSpeed's ZeRO optimizers skip a step whose gradients overflow (`engine.skipped_steps`, restored from
its checkpoints): such steps are counted, and more than `run.max_skipped_steps` of them fail the run.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

NEVER = 2**62
"""The `first_bad` step while nothing non-finite has been seen."""


class Diverged(RuntimeError):
    """The run stopped because its loss, gradients or weights went non-finite, or too many steps were skipped."""


def nonfinite_counts(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """How many values of each tensor are NaN or ±inf: an int64 tensor on the tensors' device (no host sync)."""
    return torch.stack([(~torch.isfinite(t)).sum() for t in tensors])


def local_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """The weights this rank holds: whole parameters, or under ZeRO-3 its partition of each."""
    return [getattr(p, "ds_tensor", p).detach() for p in module.parameters()]


class Health:
    def __init__(self, max_skipped_steps: int, device: torch.device):
        self.max_skipped_steps, self.device = max_skipped_steps, device
        self.first_bad = torch.full((), NEVER, dtype=torch.int64, device=device)

    def observe(self, step: int, loss: torch.Tensor, engine) -> None:
        """Fold step `step`'s loss (a device tensor) and its applied gradient norm into the verdict, on the device.
        A step DeepSpeed skipped for overflow is not divergence: it is counted in `engine.skipped_steps`."""
        bad = ~torch.isfinite(loss)
        norm = engine.get_global_grad_norm()  # DeepSpeed's, where it computes one (ZeRO 1-3), else None
        if norm is not None and engine.was_step_applied():
            bad = bad | (not math.isfinite(norm) if isinstance(norm, float) else ~torch.isfinite(norm))
        self.first_bad = torch.minimum(self.first_bad, torch.where(bad, step, NEVER))

    def problem(self, step: int, engine, *, weights: bool = False) -> str | None:
        """Why the run must stop at `step`, or None; the same answer on every rank (one all-reduce).
        `weights`: also check this rank's weights (before sealing a checkpoint of them)."""
        bad_weights = nonfinite_counts(local_weights(engine.module)).sum() > 0 if weights else torch.zeros((), dtype=torch.bool, device=self.device)
        verdict = torch.stack([self.first_bad, -bad_weights.to(self.first_bad)])  # MIN of both: any rank's bad weights
        if dist.is_initialized():
            dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
        first, bad_weights = verdict.tolist()
        if first < NEVER:
            return f"the loss or gradient norm is not finite (NaN or inf) at step {first}: the run diverged"
        if bad_weights:
            return f"the weights are not finite (NaN or inf) after step {step}: the run diverged"
        if engine.skipped_steps > self.max_skipped_steps:
            return (f"DeepSpeed has skipped {engine.skipped_steps} of {step} steps for non-finite gradients "
                    f"(overflow), more than run.max_skipped_steps={self.max_skipped_steps}: the run diverged at step {step}")
        return None

