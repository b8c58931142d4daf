"""Owner-sharded data parallelism for optimizers that need whole matrices (GradNormLoRP) or keep
per-block curvature state (Sophia, AdaHessian, M-FAC).

DeepSpeed ZeRO hands an optimizer flat 1-D partitions, which destroys the 2-D structure a low-rank
projection needs. Instead each rank owns whole parameters (`ownership.assign_owners`) and wraps the
unchanged `optim/` optimizer so that:

    1. gradients: every rank has the averaged gradient (DeepSpeed's all-reduce), or, per layer,
       each gradient is reduced to its owner inside backward;
    2. the owner alone runs the update for its parameters — state (projector, moments, 8-bit codes)
       exists only there, so optimizer memory per rank ≈ total / N;
    3. the updated weights are broadcast from their owners.

Everything else (precision, gradient accumulation, clipping, checkpoint I/O) stays with the DeepSpeed
engine, at ZeRO stage 0. Each rank checkpoints its own shard (`state_dict`).

Curvature estimates (`reduce_estimates_to_owners`) are summed onto each block's owner with one
`dist.reduce` per block (not an all-reduce and a broadcast), so only the owner ever holds a block's
estimate and curvature state. An update rule that re-evaluates the batch (M-FAC with GNS damping)
steps all owned blocks at once with a closure (`step_with_closure`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from curvtrain.optim.per_layer import step_one_param


class OwnerShardedOptimizer(torch.optim.Optimizer):
    """Runs `inner` only on the parameters this rank owns; shares `inner`'s param groups (so LR
    schedules act on it) and state. `per_layer=True` makes `step()` a no-op: the hooks of
    `optim.attach_per_layer_step` call `step_param` inside backward instead."""

    def __init__(self, inner: torch.optim.Optimizer, owners: dict[str, int], names: dict[torch.Tensor, str], *, per_layer: bool = False):
        self.inner, self.per_layer = inner, per_layer
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.owner = {p: owners[names[p]] for group in inner.param_groups for p in group["params"]}
        super().__init__([{"params": [p]} for p in self.owner], inner.defaults)
        self.param_groups, self.state = inner.param_groups, inner.state  # one set of groups and state
        self.closure: Callable[[], torch.Tensor] | None = None
        """Set by the trainer for an update rule whose step needs a closure (DeepSpeed calls step() bare)."""
        if hasattr(inner, "reduce_sum"):  # the rule's norms are over all blocks: add the shards' partial sums
            inner.reduce_sum = _sum_over_ranks

    @torch.no_grad()
    def step(self, closure=None):
        """Like torch.optim.Optimizer.step: `closure` (or the trainer's `self.closure`) re-evaluates the
        loss and calls backward, with gradients enabled, and its loss is returned. With per-layer
        updates that backward steps every parameter inside its hooks; otherwise the owners step their
        blocks together through the closure (`step_with_closure`)."""
        closure = closure or self.closure
        if self.per_layer:
            if closure is None:
                return None  # every parameter was already stepped inside backward
            with torch.enable_grad():
                return closure()
        if closure is not None:
            return self.step_with_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if self.owner[p] == self.rank and p.grad is not None:
                    step_one_param(self.inner, p, group)
        self.broadcast_from_owners()
        return None

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict) -> None:
        """Per-layer step of one parameter: reduce its gradient to the owner, update there, broadcast."""
        owner = self.owner[p]
        dist.reduce(p.grad, dst=owner, op=dist.ReduceOp.SUM)
        if owner == self.rank:
            p.grad.div_(self.world_size)
            step_one_param(self.inner, p, group)
        dist.broadcast(p.data, src=owner)

    @torch.no_grad()
    def step_with_closure(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One step of `inner` over all owned parameters together; before each evaluation of `closure`
        (which computes the loss and the averaged gradients on every rank) the owners' trial weights
        are broadcast, so every rank evaluates the same point."""

        def at_current_weights() -> torch.Tensor:
            self.broadcast_from_owners()
            return closure()

        saved = [group["params"] for group in self.param_groups]
        for group in self.param_groups:
            group["params"] = [p for p in group["params"] if self.owner[p] == self.rank]
        try:
            loss = self.inner.step(at_current_weights)
        finally:
            for group, params in zip(self.param_groups, saved):
                group["params"] = params
        self.broadcast_from_owners()
        return loss

    @torch.no_grad()
    def reduce_estimates_to_owners(self, params: Sequence[torch.Tensor], estimates: Sequence[torch.Tensor], scale: float) -> None:
        """Curvature estimates, one per parameter (this rank's sum): each is summed onto its owner
        (`dist.reduce`, SUM) and scaled there by `scale`; the owner's lands in p.grad for the update
        rule's `update_hessian()`, the other ranks keep no copy (p.grad = None)."""
        for p, estimate in zip(params, estimates):
            owner = self.owner[p]
            dist.reduce(estimate, dst=owner, op=dist.ReduceOp.SUM)
            p.grad = estimate.mul_(scale) if owner == self.rank else None

    def update_hessian(self) -> None:
        """Fold the estimates in p.grad (owned blocks only) into the rule's curvature state."""
        self.inner.update_hessian()

    def broadcast_from_owners(self) -> None:
        for p, owner in self.owner.items():
            dist.broadcast(p.data, src=owner)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.inner.state_dict()  # holds state for owned parameters only

    def load_state_dict(self, state_dict: dict) -> None:
        # torch's load_state_dict builds new group dicts; the LR scheduler and the per-layer hooks hold
        # the existing ones, so copy the loaded hyperparameters back into those.
        groups = self.inner.param_groups
        self.inner.load_state_dict(state_dict)
        for group, loaded in zip(groups, self.inner.param_groups):
            group.update(loaded)
        self.inner.param_groups = self.param_groups = groups


def _sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    value = value.clone()
    dist.all_reduce(value)
    return value
