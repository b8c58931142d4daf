"""Owner-sharded data parallelism for optimizers that need whole matrices (GradNormLoRP) or keep
per-block curvature state (Sophia, AdaHessian, M-FAC).

DeepSpeed ZeRO hands an optimizer flat 1-D partitions, which destroys the 2-D structure a low-rank
projection needs. Instead each rank owns whole parameters (`ownership.assign_owners`) and wraps the
unchanged `optim/` optimizer so that:

    1. gradients: each gradient is summed onto its owner only (`dist.reduce`), in buckets of one
       owner's parameters; the engine's own all-reduce is off (`engine.build_engine`);
    2. the owner alone clips (by the global norm, one scalar all-reduce) and runs the update for its
       parameters — state (projector, moments, 8-bit codes) exists only there, so optimizer memory per
       rank ≈ total / N, and non-owners drop their gradient copies;
    3. the updated weights come back from their owners, one broadcast per bucket.

Volume per worker and step, N workers, M bytes of weights: a reduce and a broadcast each send
(N−1)/N of their buffer on bandwidth-optimal (ring, pipelined) algorithms, so 2(N−1)/N·M — the volume
of DDP's all-reduce — where an all-reduce followed by a broadcast per parameter sent 3(N−1)/N·M.
Buckets (`Buckets`) hold parameters of one owner and dtype in backward order, up to `bucket_bytes`
(DDP's 25 MiB default; a larger parameter is a bucket of its own).

With per-layer updates (`optim.per_layer`, the hooks call `step_param` inside backward) the traffic
overlaps backward: a bucket's reduce is issued asynchronously as soon as its last gradient exists; when
the next bucket is issued, the previous one is finished (its owner updates it and sends the weights back,
asynchronously) while backward keeps running, and received weights are written as soon as they arrive.
Gradients live only in bucket buffers of a few buckets, never the whole model's. `step()` drains the rest.

Everything else (precision, gradient accumulation, checkpoint I/O) stays with the DeepSpeed engine, at
ZeRO stage 0. Each rank checkpoints its own shard (`state_dict`).

Curvature estimates (`reduce_estimates_to_owners`) travel the same way as gradients, so only the owner
ever holds a block's estimate and curvature state. An update rule that re-evaluates the batch (M-FAC
with GNS damping) steps all owned blocks at once with a closure (`step_with_closure`).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from curvtrain.optim.per_layer import step_one_param

BUCKET_BYTES = 25 * 2**20
"""Bucket size cap, as DDP's `bucket_cap_mb=25`."""


@dataclass(eq=False)
class Bucket:
    """Parameters of one owner and one dtype that travel together in one flat buffer."""

    owner: int
    offsets: dict[Tensor, int] = field(default_factory=dict)  # each parameter's start in the buffer, in plan order
    numel: int = 0
    buffer: Tensor | None = None  # allocated for one trip, freed after it
    arrived: set = field(default_factory=set)  # per-layer: parameters whose gradient is in the buffer
    work: object = None  # the collective in flight

    def view(self, p: Tensor) -> Tensor:
        """p's part of the buffer, shaped like p."""
        start = self.offsets[p]
        return self.buffer[start:start + p.numel()].view_as(p)

    def slices(self) -> Iterable[tuple[Tensor, Tensor]]:
        """(parameter, its view of the buffer) pairs."""
        for p in self.offsets:
            yield p, self.view(p)

    def allocate(self) -> Tensor:
        """A fresh, uninitialized buffer for one trip."""
        first = next(iter(self.offsets))
        self.buffer = torch.empty(self.numel, dtype=first.dtype, device=first.device)
        return self.buffer

    def pack(self, values: Callable[[Tensor], Tensor | None], *, zero_missing: bool = True) -> Tensor:
        """A fresh buffer holding values(p) of every parameter (zeros, or nothing, where it is None)."""
        self.allocate()
        for p, view in self.slices():
            value = values(p)
            if value is not None:
                view.copy_(value)
            elif zero_missing:
                view.zero_()
        return self.buffer


class Buckets(list):
    """The bucket plan: every parameter in exactly one bucket; the same on every rank (it depends only on
    the parameter order, the owners and `cap_bytes`)."""

    def __init__(self, params: Sequence[Tensor], owner: dict[Tensor, int], cap_bytes: int = BUCKET_BYTES):
        super().__init__()
        open_: dict[tuple[int, torch.dtype], Bucket] = {}
        for p in params:
            key = (owner[p], p.dtype)
            bucket = open_.get(key)
            if bucket is None:
                bucket = open_[key] = Bucket(owner[p])
                self.append(bucket)
            bucket.offsets[p] = bucket.numel
            bucket.numel += p.numel()
            if bucket.numel * p.element_size() >= cap_bytes:
                del open_[key]
        self.of = {p: bucket for bucket in self for p in bucket.offsets}


class OwnerShardedOptimizer(torch.optim.Optimizer):
    """Runs `inner` only on the parameters this rank owns; shares `inner`'s param groups (so LR
    schedules act on it) and state. `names` lists the parameters in model order (backward runs in
    reverse). `max_grad_norm` > 0 clips by the global gradient norm (the engine's clipping must be off:
    it would see only local gradients). `per_layer=True`: the hooks of `optim.attach_per_layer_step`
    call `step_param` inside backward, and `step()` finishes what is still in flight."""

    def __init__(self, inner: torch.optim.Optimizer, owners: dict[str, int], names: dict[Tensor, str], *,
                 per_layer: bool = False, max_grad_norm: float = 0.0, bucket_bytes: int = BUCKET_BYTES):
        self.inner, self.per_layer, self.max_grad_norm = inner, per_layer, max_grad_norm
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.group_of = {p: group for group in inner.param_groups for p in group["params"]}
        self.owner = {p: owners[names[p]] for p in self.group_of}
        super().__init__([{"params": [p]} for p in self.owner], inner.defaults)
        self.param_groups, self.state = inner.param_groups, inner.state  # one set of groups and state
        self.buckets = Buckets([p for p in reversed(names) if p in self.owner], self.owner, bucket_bytes)
        self.reducing: deque[Bucket] = deque()  # per-layer: gradient reduces in flight, oldest first
        self.returning: deque[Bucket] = deque()  # weight broadcasts in flight, oldest first
        self.closure: Callable[[], Tensor] | None = None
        """Set by the trainer for an update rule whose step needs a closure (DeepSpeed calls step() bare)."""
        if hasattr(inner, "reduce_sum"):  # the rule's norms are over all blocks: add the shards' partial sums
            inner.reduce_sum = _sum_over_ranks

    def owns(self, p: Tensor) -> bool:
        return self.owner[p] == self.rank

    @torch.no_grad()
    def step(self, closure=None):
        """Like torch.optim.Optimizer.step: `closure` (or the trainer's `self.closure`) re-evaluates the
        loss and calls backward, with gradients enabled, and its loss is returned. With per-layer
        updates that backward steps every parameter inside its hooks; otherwise the owners step their
        blocks together through the closure (`step_with_closure`). Without a closure: the step of the
        module docstring on this rank's local gradients."""
        closure = closure or self.closure
        if self.per_layer:
            self.finish_per_layer_step()
            if closure is None:
                return None  # every parameter was already stepped inside backward
            with torch.enable_grad():
                loss = closure()
            self.finish_per_layer_step()
            return loss
        if closure is not None:
            return self.step_with_closure(closure)
        self.reduce_to_owners(self.take_grads(), scale=1 / self.world_size)
        self.clip_grad_norm()
        for p, group in self.group_of.items():
            if self.owns(p) and p.grad is not None:
                step_one_param(self.inner, p, group)
        self.send_weights_from_owners()
        return None

    # ---- gradients and estimates to owners ----
    def take_grads(self) -> dict[Tensor, Tensor | None]:
        """This rank's gradients, taken out of p.grad (so each is freed once it is packed)."""
        grads = {}
        for p in self.owner:
            grads[p], p.grad = p.grad, None
        return grads

    @torch.no_grad()
    def reduce_to_owners(self, values: dict[Tensor, Tensor | None], scale: float) -> None:
        """Sum `values` (one tensor per parameter, this rank's part; consumed) onto each parameter's owner,
        bucket by bucket, scale there by `scale`, and leave the result in p.grad on the owner; p.grad = None
        elsewhere."""
        for bucket in self.buckets:
            bucket.pack(lambda p: values.pop(p, None)).mul_(scale)
            bucket.work = dist.reduce(bucket.buffer, dst=bucket.owner, op=dist.ReduceOp.SUM, async_op=True)
        for bucket in self.buckets:
            bucket.work.wait()
            for p, view in bucket.slices():
                p.grad = view if self.owns(p) else None  # the owner's gradients are views of its buffer
            bucket.buffer = bucket.work = None

    def clip_grad_norm(self) -> None:
        """torch.nn.utils.clip_grad_norm_ over all ranks' owned gradients: scale by max_norm / (‖g‖ + 1e-6)
        where that is below 1 (‖g‖ from each rank's partial sum of squares, all-reduced)."""
        if self.max_grad_norm <= 0:
            return
        grads = [p.grad for p in self.owner if self.owns(p) and p.grad is not None]
        total = _sum_over_ranks(sum((g.double().square().sum() for g in grads), torch.zeros((), dtype=torch.float64)))
        coef = self.max_grad_norm / (total.sqrt().item() + 1e-6)
        if coef < 1:
            torch._foreach_mul_(grads, coef)

    @torch.no_grad()
    def reduce_estimates_to_owners(self, params: Sequence[Tensor], estimates: Sequence[Tensor], scale: float) -> None:
        """Curvature estimates, one per parameter (this rank's sum): each is summed onto its owner and
        scaled there by `scale`; the owner's lands in p.grad for the update rule's `update_hessian()`, the
        other ranks keep no copy (p.grad = None)."""
        self.reduce_to_owners(dict(zip(params, estimates)), scale)

    # ---- weights from owners ----
    @torch.no_grad()
    def send_weights_from_owners(self) -> None:
        """Every bucket's weights broadcast from its owner, all in flight together."""
        for bucket in self.buckets:
            self.send_weights(bucket)
        self.receive_weights()

    def send_weights(self, bucket: Bucket) -> None:
        """Start the broadcast of `bucket`'s weights from its owner (reusing its buffer when it has one)."""
        mine = bucket.owner == self.rank
        if bucket.buffer is None:
            bucket.pack(lambda p: p.detach() if mine else None, zero_missing=False)
        elif mine:
            for p, view in bucket.slices():
                view.copy_(p.detach())
        bucket.work = dist.broadcast(bucket.buffer, src=bucket.owner, async_op=True)
        self.returning.append(bucket)

    def receive_weights(self, keep: int = 0) -> None:
        """Finish the oldest broadcasts in flight until `keep` remain: write the weights on non-owners."""
        while len(self.returning) > keep:
            bucket = self.returning.popleft()
            bucket.work.wait()
            if bucket.owner != self.rank:
                for p, view in bucket.slices():
                    p.data.copy_(view)
            bucket.buffer = bucket.work = None

    # ---- per-layer: overlapped with backward ----
    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict) -> None:
        """Per-layer hook of one parameter: its gradient joins its bucket; a full bucket starts its reduce
        to the owner, and the bucket before it is finished (module docstring)."""
        bucket = self.buckets.of[p]
        if bucket.buffer is None:
            bucket.allocate()
        bucket.view(p).copy_(p.grad)
        bucket.arrived.add(p)
        if len(bucket.arrived) == len(bucket.offsets):
            self.start_reduce(bucket)
            self.finish_reduces(keep=1)
            self.receive_weights(keep=1)

    def start_reduce(self, bucket: Bucket) -> None:
        for p, view in bucket.slices():
            if p not in bucket.arrived:  # no gradient this step (an unused parameter)
                view.zero_()
        bucket.work = dist.reduce(bucket.buffer, dst=bucket.owner, op=dist.ReduceOp.SUM, async_op=True)
        self.reducing.append(bucket)

    def finish_reduces(self, keep: int) -> None:
        """Finish the oldest reduces in flight until `keep` remain: the owner steps the parameters that had
        a gradient, and the bucket's weights start back."""
        while len(self.reducing) > keep:
            bucket = self.reducing.popleft()
            bucket.work.wait()
            if bucket.owner == self.rank:
                for p, view in bucket.slices():
                    if p in bucket.arrived:
                        p.grad = view.div_(self.world_size)
                        step_one_param(self.inner, p, self.group_of[p])
                        p.grad = None
            bucket.arrived.clear()
            self.send_weights(bucket)

    def finish_per_layer_step(self) -> None:
        """After backward: start the buckets that are not complete (in plan order, the same on every rank),
        and finish every reduce and broadcast."""
        for bucket in self.buckets:
            if bucket.arrived and bucket not in self.reducing:
                self.start_reduce(bucket)
        self.finish_reduces(keep=0)
        self.receive_weights(keep=0)

    # ---- update rules with a closure ----
    @torch.no_grad()
    def step_with_closure(self, closure: Callable[[], Tensor]) -> Tensor:
        """One step of `inner` over all owned parameters together; before each evaluation of `closure`
        (which computes the loss and the averaged gradients on every rank) the owners' trial weights
        are sent, so every rank evaluates the same point."""

        def at_current_weights() -> Tensor:
            self.send_weights_from_owners()
            return closure()

        saved = [group["params"] for group in self.param_groups]
        for group in self.param_groups:
            group["params"] = [p for p in group["params"] if self.owns(p)]
        try:
            loss = self.inner.step(at_current_weights)
        finally:
            for group, params in zip(self.param_groups, saved):
                group["params"] = params
        self.send_weights_from_owners()
        return loss

    def update_hessian(self) -> None:
        """Fold the estimates in p.grad (owned blocks only) into the rule's curvature state."""
        self.inner.update_hessian()

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


def _sum_over_ranks(value: Tensor) -> Tensor:
    value = value.clone()
    dist.all_reduce(value)
    return value
