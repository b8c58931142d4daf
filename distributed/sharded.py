"""Owner-sharded data parallelism for optimizers that need whole matrices (GradNormLoRP).

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
"""
from __future__ import annotations

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

    @torch.no_grad()
    def step(self, closure=None):
        """Like torch.optim.Optimizer.step: `closure` (re-evaluates the loss and calls backward) runs
        first, with gradients enabled, and its loss is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.per_layer:
            return loss  # every parameter was already stepped inside backward
        for group in self.param_groups:
            for p in group["params"]:
                if self.owner[p] == self.rank and p.grad is not None:
                    step_one_param(self.inner, p, group)
        self.broadcast_from_owners()
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict) -> None:
        """Per-layer step of one parameter: reduce its gradient to the owner, update there, broadcast."""
        owner = self.owner[p]
        dist.reduce(p.grad, dst=owner, op=dist.ReduceOp.SUM)
        if owner == self.rank:
            p.grad.div_(self.world_size)
            step_one_param(self.inner, p, group)
        dist.broadcast(p.data, src=owner)

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
