"""Whole blocks on owners, for update rules that need whole matrices (GradNormLoRP, Muon) or keep
per-block curvature state (Sophia, AdaHessian, M-FAC), and for per-layer updates.

DeepSpeed ZeRO hands an optimizer flat 1-D partitions, which destroys the 2-D structure a low-rank
projection needs. Instead each rank owns whole parameters (`ownership.assign_owners`) and runs the
unchanged `optim/` rule on those only:

    1. gradients: each gradient is summed onto its owner only (`dist.reduce`), in buckets of one
       owner's parameters; the engine's own all-reduce is off (`OwnerDistributor.attach`);
    2. the owner alone clips (by the global norm, one scalar all-reduce) and runs the update for its
       parameters — state (projector, moments, 8-bit codes) exists only there, so optimizer memory per
       rank ≈ total / N, and non-owners drop their gradient copies;
    3. the updated weights come back from their owners, one broadcast per bucket.

Volume per worker and step, N workers, M bytes of weights: a reduce and a broadcast each send
(N−1)/N of their buffer on bandwidth-optimal (ring, pipelined) algorithms, so 2(N−1)/N·M — the volume
of DDP's all-reduce — where an all-reduce followed by a broadcast per parameter sent 3(N−1)/N·M.
Buckets (`Buckets`) hold parameters of one owner and dtype in backward order, up to `bucket_bytes`
(DDP's 25 MiB default; a larger parameter is a bucket of its own).

With per-layer updates (this distributor's own hooks, `optim.per_layer.on_accumulated_grad`) the traffic
overlaps backward: a bucket's reduce is issued asynchronously as soon as its last gradient exists; when
the next bucket is issued, the previous one is finished (its owner updates it and sends the weights back,
asynchronously) while backward keeps running, and received weights are written as soon as they arrive.
Gradients live only in bucket buffers of a few buckets, never the whole model's. `step()` drains the rest.

Everything else (precision, gradient accumulation, the model's checkpoint files) stays with the DeepSpeed
engine, at ZeRO stage 0. Each rank checkpoints the rule's state of the parameters it owns, by name
(`OPTIMIZER_SHARD`, `param_state`), so a checkpoint resumes at any worker count; DeepSpeed is kept from
writing a second copy of rank 0's.

Curvature estimates (`reduce_estimates`) travel the same way as gradients, so only the owner ever holds
a block's estimate and curvature state. An update rule that re-evaluates the batch (M-FAC with GNS
damping) steps all owned blocks at once (`step_with_closure`): its first point is the loop's own pass,
each trial point one evaluation whose gradients go to the owners in the same buckets.
"""
from __future__ import annotations

import fnmatch
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from curvtrain.distributed.checkpoint import CheckpointError
from curvtrain.distributed.distributor import param_state
from curvtrain.distributed.distributor.base import OPTIMIZER_SHARD, Distributor, StepClosure, sum_over_ranks
from curvtrain.distributed.ownership import plan_for
from curvtrain.optim.per_layer import on_accumulated_grad, step_one_param

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


class OwnerDistributor(Distributor):
    """Runs the rule only on the parameters this rank owns (module docstring); the rule's param groups and
    state are its own, shared with the engine's optimizer (so LR schedules act on them). `per_layer`:
    every gradient joins its bucket inside backward and `step()` finishes what is still in flight.
    `engine.grad_clip` > 0 clips by the global gradient norm (the engine's clipping is off: it would see
    only local gradients)."""

    name = "owner"

    # ---- before any worker starts ----
    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.engine.zero_stage != 0:
            why = "optimizer.per_layer" if cfg.optimizer.per_layer else f"optimizer.name={cfg.optimizer.name} (needs whole blocks)"
            raise ValueError(
                f"{why} runs on block owners across workers and needs engine.zero_stage=0: ZeRO 1-3 hand the "
                f"optimizer flat partitions (got engine.zero_stage={cfg.engine.zero_stage})"
            )
        if cfg.optimizer.per_layer and cfg.engine.grad_clip > 0:
            raise ValueError("optimizer.per_layer frees each gradient inside backward, so there is no global norm to clip: set engine.grad_clip=0")

    @classmethod
    def engine_config(cls, cfg) -> dict:
        config = super().engine_config(cfg)
        config["gradient_clipping"] = 0.0  # each gradient reaches only its owner; the owners clip by the global norm
        config["bf16"] = {"enabled": False}  # a bf16 model instead: DeepSpeed's bf16 optimizer flattens parameters
        return config

    @classmethod
    def plan(cls, model, rule, cfg) -> dict[str, int]:
        return plan_for(model, rule, cfg.workers.num_workers, own_cost=cfg.optimizer.needs.state_cost)

    @classmethod
    def check_checkpoint(cls, manifest: dict, ckpt: Path, cfg) -> None:
        super().check_checkpoint(manifest, ckpt, cfg)
        if not fnmatch.filter(manifest["files"], OPTIMIZER_SHARD.format("*")):
            raise CheckpointError(
                f"checkpoint {ckpt} holds no {OPTIMIZER_SHARD.format('<rank>')} files: it was written by an earlier "
                f"curvtrain, whose per-worker optimizer shards this one does not read"
            )

    # ---- in a worker ----
    def __init__(self, cfg, model: torch.nn.Module, rule: torch.optim.Optimizer, owners: dict[str, int]):
        self.names = names = {p: n for n, p in model.named_parameters()}
        self.rule, self.owners, self.per_layer = rule, owners, cfg.optimizer.per_layer
        self.max_grad_norm, self.grad_accum = cfg.engine.grad_clip, cfg.grad_accum
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.group_of = {p: group for group in rule.param_groups for p in group["params"]}
        self.owner = {p: owners[names[p]] for p in self.group_of}
        self.buckets = Buckets([p for p in reversed(names) if p in self.owner], self.owner, int(cfg.engine.bucket_mb * 2**20))
        self.reducing: deque[Bucket] = deque()  # per-layer: gradient reduces in flight, oldest first
        self.returning: deque[Bucket] = deque()  # weight broadcasts in flight, oldest first
        self.client_optimizer = _EngineOptimizer(self)
        self.hooks = None

    def attach(self, engine) -> None:
        engine.enable_backward_allreduce = False  # each gradient is reduced to its owner only
        if self.per_layer:
            self.hooks = on_accumulated_grad(self.owner, self.collect, accumulation_steps=self.grad_accum)

    def owns(self, p: Tensor) -> bool:
        return self.owner[p] == self.rank

    @torch.no_grad()
    def step(self) -> None:
        """The three stages of the module docstring on this rank's local gradients (or, per-layer, what is
        still in flight of them); through `step_with_closure` where the loop set a closure."""
        if self.per_layer:
            self.finish_per_layer_step()
            return
        if self.closure is not None:
            self.step_with_closure(self.closure)
            return
        self.reduce_grads_to_owners()
        self.clip_grad_norm()
        for p, group in self.group_of.items():
            if self.owns(p) and p.grad is not None:
                step_one_param(self.rule, p, group)
        self.send_weights_from_owners()

    # ---- gradients and estimates to owners ----
    def take_grads(self) -> dict[Tensor, Tensor | None]:
        """This rank's gradients, taken out of p.grad (so each is freed once it is packed)."""
        grads = {}
        for p in self.owner:
            grads[p], p.grad = p.grad, None
        return grads

    @torch.no_grad()
    def reduce_to_owners(self, values: dict[Tensor, Tensor | None], scale: float) -> dict[Tensor, Tensor]:
        """Sum `values` (one tensor per parameter, this rank's part; consumed) onto each parameter's owner,
        bucket by bucket, scale there by `scale`, and return the sums of the parameters this rank owns
        (views of the bucket buffers); p.grad is None everywhere afterwards."""
        for bucket in self.buckets:
            bucket.pack(lambda p: values.pop(p, None)).mul_(scale)
            bucket.work = dist.reduce(bucket.buffer, dst=bucket.owner, op=dist.ReduceOp.SUM, async_op=True)
        owned = {}
        for bucket in self.buckets:
            bucket.work.wait()
            if bucket.owner == self.rank:
                owned.update(bucket.slices())
            bucket.buffer = bucket.work = None
        return owned

    def reduce_grads_to_owners(self) -> None:
        """This rank's gradients summed and averaged onto their owners' p.grad (the others' set to None)."""
        for p, grad in self.reduce_to_owners(self.take_grads(), scale=1 / self.world_size).items():
            p.grad = grad

    def owned_grad_norm_sq(self) -> Tensor:
        """‖g‖² over all ranks' owned gradients (each rank's partial sum, all-reduced: one scalar)."""
        local = sum((p.grad.double().square().sum() for p in self.owner if self.owns(p) and p.grad is not None),
                    torch.zeros((), dtype=torch.float64))
        return sum_over_ranks(local)

    def clip_grad_norm(self) -> None:
        """torch.nn.utils.clip_grad_norm_ over all ranks' owned gradients: scale by
        min(max_norm / (‖g‖ + 1e-6), 1), computed on the device (no host sync)."""
        if self.max_grad_norm <= 0:
            return
        coef = (self.max_grad_norm / (self.owned_grad_norm_sq().sqrt() + 1e-6)).clamp_(max=1.0)
        grads = [p.grad for p in self.owner if self.owns(p) and p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef)

    @torch.no_grad()
    def reduce_estimates(self, params: Sequence[Tensor], estimates: Sequence[Tensor], scale: float) -> dict[Tensor, Tensor]:
        return self.reduce_to_owners(dict(zip(params, estimates)), scale)

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
    def collect(self, p: Tensor) -> None:
        """Per-layer hook of one parameter, once its gradient is accumulated: the gradient joins its bucket
        and is freed; a full bucket starts its reduce to the owner, and the bucket before it is finished
        (module docstring)."""
        bucket = self.buckets.of[p]
        if bucket.buffer is None:
            bucket.allocate()
        bucket.view(p).copy_(p.grad)
        p.grad = None
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
                        step_one_param(self.rule, p, self.group_of[p])
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
    def step_with_closure(self, closure: StepClosure) -> None:
        """One step of the rule over all owned parameters together (registry `Needs.closure`): its first
        point is the loop's pass (gradients in p.grad, `closure.loss`); before each trial evaluation the
        owners' trial weights are sent, so every rank evaluates the same point, and its gradients go to the
        owners in buckets."""

        def at_trial_weights() -> tuple[Tensor, Tensor]:
            self.send_weights_from_owners()
            loss = closure.evaluate()
            self.reduce_grads_to_owners()
            return sum_over_ranks(loss) / self.world_size, self.owned_grad_norm_sq()

        self.reduce_grads_to_owners()
        start = (sum_over_ranks(closure.loss) / self.world_size, self.owned_grad_norm_sq())
        saved = [group["params"] for group in self.rule.param_groups]
        for group in self.rule.param_groups:
            group["params"] = [p for p in group["params"] if self.owns(p)]
        try:
            self.rule.step(at_trial_weights, start=start)
        finally:
            for group, params in zip(self.rule.param_groups, saved):
                group["params"] = params
        self.send_weights_from_owners()

    # ---- checkpoints ----
    def save(self, engine, ckpt: Path) -> None:
        """DeepSpeed's model files, and this rank's optimizer state by parameter name (`param_state`)."""
        with _optimizer_detached(engine):  # at ZeRO 0 DeepSpeed would write rank 0's shard into the model file
            engine.save_checkpoint(str(ckpt.parent), tag=ckpt.name, save_latest=False)
        owned = [p for p in self.owner if self.owns(p)]
        param_state.save(self.rule, self.names, owned, ckpt / OPTIMIZER_SHARD.format(self.rank), with_rule_state=self.rank == 0)

    def load(self, engine, ckpt: Path) -> None:
        """The model files, and the state of the parameters this rank owns from every rank's file: the
        checkpoint may have been written by another number of workers, under another plan."""
        path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt}")
        files = sorted(ckpt.glob(OPTIMIZER_SHARD.format("*")))
        param_state.load(self.rule, self.names, [p for p in self.owner if self.owns(p)], files)


class _EngineOptimizer(torch.optim.Optimizer):
    """What the DeepSpeed engine drives: `step()` is the distributor's; param groups and state are the rule's."""

    def __init__(self, distributor: OwnerDistributor):
        rule = distributor.rule
        super().__init__([{"params": [p]} for p in distributor.group_of], rule.defaults)
        self.distributor, self.param_groups, self.state = distributor, rule.param_groups, rule.state

    def step(self, closure=None):
        if closure is not None:
            raise RuntimeError("the owner distributor takes its closure from the training loop (Distributor.closure)")
        self.distributor.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.distributor.rule.zero_grad(set_to_none=set_to_none)


@contextmanager
def _optimizer_detached(engine):
    optimizer, engine.optimizer = engine.optimizer, None
    try:
        yield
    finally:
        engine.optimizer = optimizer
