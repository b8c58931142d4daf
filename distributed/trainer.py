"""One data-parallel worker's training loop around a DeepSpeed engine.

Runs inside a process whose process group is already initialized (see `distributed.worker`).
`train_step` reads as named steps: a curvature estimate when the optimizer says one is due,
micro-batches of forward/backward, the engine's optimizer step at the accumulation boundary. The
loss stays on the device between log intervals (no host sync in the hot loop); logging, evaluation
and checkpoints are gated by their intervals.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvtrain.distributed import checkpoint
from curvtrain.distributed.config import TrainConfig, config_to_dict, save_config
from curvtrain.distributed.engine import build_engine, param_dtype, zero3_partitioner
from curvtrain.distributed.metrics import MetricsLogger, peak_memory_bytes
from curvtrain.distributed.progress import progress_bar
from curvtrain.distributed.sharded import OwnerShardedOptimizer
from curvtrain.models.data import TokenData, model_config
from curvtrain.models.llama import LlamaForCausalLM, build_llama, causal_lm_loss
from curvtrain.optim import attach_per_layer_step, build_optimizer, warmup_cosine
from curvtrain.optim.curvature import gnb_diag, hutchinson_diag


def build_model_and_optimizer(cfg: TrainConfig, device: torch.device) -> tuple[LlamaForCausalLM, torch.optim.Optimizer]:
    """The model materialized on `device` in the run's dtype, and the registry's optimizer over it.

    The weights are those of `LlamaForCausalLM` built in float32 after the global seed, cast to the run's dtype
    (`build_llama`), but no float32 copy of the model is ever held: bf16 runs hold bf16 weights (owner-sharded
    ones train them as they are, GaLore's recipe; DeepSpeed's bf16 keeps its own fp32 master partitions), and
    under ZeRO-3 each rank keeps only its partition of each parameter from the moment it is drawn. On the meta
    device nothing is drawn (the coordinator plans block ownership there).
    """
    place = zero3_partitioner(cfg) if device.type != "meta" else None
    model = build_llama(model_config(cfg.model.name, cfg.data, cfg.model.vocab_size), dtype=param_dtype(cfg), device=device, place=place)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    return model, build_optimizer(cfg.optimizer, model.named_parameters())


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, device: torch.device, owners: dict[str, int] | None = None):
        self.cfg, self.run_dir, self.device, self.owners = cfg, Path(run_dir), device, owners
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.step = 0  # optimizer steps completed
        self.tokens = 0  # training tokens consumed by all workers

        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model, optimizer = build_model_and_optimizer(cfg, device)
        self.rule = optimizer  # the update rule itself, unwrapped: its metrics
        self.needs = cfg.optimizer.needs  # what it asks of this loop (optim.registry.Needs)
        if cfg.owner_sharded:
            names = {p: n for n, p in model.named_parameters()}
            optimizer = OwnerShardedOptimizer(optimizer, owners, names, per_layer=cfg.optimizer.per_layer,
                                              max_grad_norm=cfg.engine.grad_clip,
                                              bucket_bytes=int(cfg.engine.bucket_mb * 2**20))
            if cfg.optimizer.per_layer:
                attach_per_layer_step(model, optimizer, accumulation_steps=cfg.grad_accum)
        if cfg.model.compile:
            model.compile()  # in place: parameter names stay HF-compatible for checkpoints and export
        self.optimizer = optimizer
        self.engine = build_engine(model, optimizer, warmup_cosine(optimizer, cfg.schedule), cfg)
        self.data = TokenData.from_config(cfg.data)  # a cache hit: the coordinator prepared the tokens
        self.logger: MetricsLogger | None = None  # opened by fit(), at the step it starts from

    # ---- state (everything a resume needs besides the engine) ----
    def state_dict(self) -> dict:
        state = {"step": self.step, "tokens": self.tokens, "rng": torch.get_rng_state(), "owners": self.owners}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["owners"] != self.owners:
            raise checkpoint.CheckpointError(
                "the checkpoint's block ownership differs from this run's (different worker count or optimizer "
                "targets): owner-sharded optimizer state cannot be resharded"
            )
        self.step, self.tokens = state["step"], state["tokens"]
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])

    # ---- the step ----
    def train_step(self) -> torch.Tensor:
        """One optimizer step over the global batch; returns this rank's mean micro-batch loss (on device)."""
        cfg = self.cfg
        estimated: list[torch.Tensor] = []  # losses of the micro-batches whose gradient the estimate pass took
        if self.needs.estimate is not None and self.needs.estimate.due(self.step):
            estimated = self.estimate_curvature()
        if self.needs.closure:
            self.optimizer.closure = self.batch_closure()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            if micro < len(estimated):
                loss = estimated[micro]  # its gradient is in p.grad already
            else:
                inputs, targets = self.micro_batch(micro)
                loss = self.engine(inputs, targets)
                self.engine.backward(loss)  # DeepSpeed scales by 1/grad_accum and reduces at the boundary
            self.engine.step()  # optimizer + LR step only at the accumulation boundary
            loss_sum += loss.detach().float()
        self.step += 1
        self.tokens += cfg.batch.global_batch_size * cfg.data.seq_len
        return loss_sum / cfg.grad_accum

    def micro_batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of this rank's micro-batch `micro` of the current step, on the device."""
        b = self.cfg.batch
        inputs, targets = self.data.train_batch(self.step, micro, self.rank, self.world_size, b.micro_batch_size, self.cfg.grad_accum)
        return inputs.to(self.device), targets.to(self.device)

    def estimate_curvature(self) -> list[torch.Tensor]:
        """The optimizer's curvature estimate (registry `Estimate`) on this step's first micro-batches,
        taken on engine.module through torch.autograd.grad, so that neither DeepSpeed's gradient buffers
        nor per-layer hooks see it; the mean over all workers' micro-batches is reduced to each block's
        owner and folded into the optimizer's state there. Each micro-batch draws its labels (GNB) or
        Rademacher vectors (Hutchinson) from a generator seeded by (seed, step, global micro-batch), so
        the estimate does not depend on which worker computes it.

        The estimate's forward (GNB) or first backward (Hutchinson) also gives the training gradient of
        those micro-batches: it is left in p.grad, scaled as engine.backward would, and their losses are
        returned, so the step does not run them again."""
        est, module, accum = self.needs.estimate, self.engine.module, self.cfg.grad_accum
        params = [p for p in module.parameters() if p.requires_grad]
        grads = [torch.zeros_like(p) for p in params]
        count = est.micro_batches or accum
        total, losses = None, []

        def train_loss(out: torch.Tensor, targets: torch.Tensor, micro: int) -> torch.Tensor:
            loss = causal_lm_loss(out, targets) if est.estimator == "gnb" else out
            if len(losses) == micro:  # the first evaluation, at θ (a finite difference evaluates again at θ + εu)
                losses.append(loss.detach())
            return loss

        for micro in range(count):
            inputs, targets = self.micro_batch(micro)
            generator = torch.Generator(self.device).manual_seed(
                hash((self.cfg.run.seed, self.step, micro * self.world_size + self.rank)) & (2**63 - 1)
            )
            if est.estimator == "gnb":  # the model returns logits when given no targets
                diag = gnb_diag(lambda: module(inputs), params, generator=generator,
                                train_loss=lambda logits: train_loss(logits, targets, micro), grad_out=grads)
            else:
                with sdpa_kernel(SDPBackend.MATH) if est.method == "autograd" else nullcontext():  # twice differentiable
                    diag = hutchinson_diag(lambda: train_loss(module(inputs, targets), targets, micro), params,
                                           method=est.method, generator=generator, grad_out=grads)
            total = diag if total is None else [t.add_(d) for t, d in zip(total, diag)]
        self.optimizer.reduce_estimates_to_owners(params, total, scale=1 / (count * self.world_size))
        self.optimizer.update_hessian()
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g.div_(accum)
        return losses

    def batch_closure(self) -> Callable[[], torch.Tensor]:
        """A closure for optimizers that re-evaluate the step's batch (registry `closure`): the mean loss
        of the step's global batch at the current weights, and its mean gradient in every p.grad, on every
        rank (taken through torch.autograd.grad on engine.module, reduced with all-reduce)."""
        module, accum = self.engine.module, self.cfg.grad_accum
        params = [p for p in module.parameters() if p.requires_grad]
        batches = [self.micro_batch(micro) for micro in range(accum)]

        def closure() -> torch.Tensor:
            loss_sum, grads = torch.zeros((), device=self.device), [torch.zeros_like(p) for p in params]
            with torch.enable_grad():
                for inputs, targets in batches:
                    loss = module(inputs, targets) / accum
                    for g, d in zip(grads, torch.autograd.grad(loss, params)):
                        g.add_(d)
                    loss_sum += loss.detach().float()
            for p, g in zip(params, grads):
                dist.all_reduce(g)
                p.grad = g.div_(self.world_size)
            dist.all_reduce(loss_sum)
            return loss_sum / self.world_size

        return closure

    def optimizer_metrics(self) -> dict[str, float]:
        """The update rule's own statistics (Sophia's win rate, GNS's γ): its (numerator, denominator)
        sums of this rank's blocks added up over all ranks."""
        if not hasattr(self.rule, "metrics"):
            return {}
        out = {}
        for name, (num, den) in self.rule.metrics().items():
            pair = torch.stack([num, den]).to(self.device, torch.float64)
            dist.all_reduce(pair)
            out[name] = (pair[0] / pair[1]).item()
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the first run.eval_samples held-out sequences, all ranks together."""
        self.engine.eval()
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)
        for inputs, targets in self.data.val_batches(
            self.cfg.batch.micro_batch_size, self.rank, self.world_size, self.cfg.run.eval_samples
        ):
            loss = self.engine(inputs.to(self.device), targets.to(self.device))
            totals += torch.stack([loss.double() * targets.numel(), torch.tensor(float(targets.numel()), device=self.device, dtype=torch.float64)])
        dist.all_reduce(totals)
        self.engine.train()
        return (totals[0] / totals[1]).item()

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        value = value.detach().clone()
        dist.all_reduce(value)
        return value.item() / self.world_size

    # ---- checkpoints ----
    def save_checkpoint(self) -> Path:
        ckpt = self.run_dir / "checkpoints" / checkpoint.tag_for(self.step)
        self.write_checkpoint(ckpt)
        self.seal_checkpoint(ckpt)
        return ckpt

    def write_checkpoint(self, ckpt: Path) -> None:
        """This rank's files of checkpoint folder `ckpt` (`checkpoint.writer_rank` names the writer)."""
        self.engine.save_checkpoint(str(ckpt.parent), tag=ckpt.name, save_latest=False)
        torch.save(self.state_dict(), ckpt / f"trainer_rank{self.rank}.pt")
        if self.cfg.owner_sharded:  # DeepSpeed (ZeRO 0) saves rank 0's optimizer only; each rank owns a shard
            torch.save(self.optimizer.state_dict(), ckpt / f"optimizer_rank{self.rank}.pt")
        if self.rank == 0:
            save_config(self.cfg, ckpt / "config.yaml")

    def seal_checkpoint(self, ckpt: Path) -> None:
        """Each rank hashes the files it just wrote, all in parallel; rank 0 gathers the hashes, writes
        the manifest and LATEST, and prunes old checkpoints."""
        own = checkpoint.hash_own_files(ckpt, self.rank)
        hashes = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(own, hashes, dst=0)  # also: every rank's files are on disk
        if self.rank == 0:
            checkpoint.write_manifest(ckpt, hashes, step=self.step, world_size=self.world_size, zero_stage=self.cfg.engine.zero_stage)
            checkpoint.prune(ckpt.parent, self.cfg.run.keep_checkpoints)
        dist.barrier()

    def load_checkpoint(self, ckpt_dir: Path) -> None:
        ckpt_dir = Path(ckpt_dir)
        sharded = self.cfg.owner_sharded
        with checkpoint.weights_only_loading():  # DeepSpeed's loader too: nothing in a checkpoint is unpickled
            path, _ = self.engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=not sharded)
            if path is None:
                raise checkpoint.CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir}")
            self.load_state_dict(torch.load(ckpt_dir / f"trainer_rank{self.rank}.pt", weights_only=True))
            if sharded:
                self.optimizer.load_state_dict(torch.load(ckpt_dir / f"optimizer_rank{self.rank}.pt", weights_only=True))

    # ---- the loop ----
    def fit(self) -> dict:
        run, max_steps = self.cfg.run, self.cfg.schedule.max_steps
        progress = progress_bar(self.step, max_steps) if self.rank == 0 else None
        self.logger = MetricsLogger(self.run_dir, start_step=self.step, wandb=self.cfg.run.wandb,
                                    config=config_to_dict(self.cfg)) if self.rank == 0 else None
        summary: dict = {}
        start, start_tokens = time.perf_counter(), self.tokens
        while self.step < max_steps:
            lr = self.engine.get_lr()[0]  # the rate this step's update uses
            loss = self.train_step()
            last = self.step == max_steps
            record: dict = {"step": self.step}
            if self.step % run.log_interval == 0 or last:
                record.update(
                    loss=self.mean_over_ranks(loss),
                    lr=lr,
                    tokens=self.tokens,
                    tokens_per_s=(self.tokens - start_tokens) / max(time.perf_counter() - start, 1e-9),
                    elapsed_s=time.perf_counter() - start,
                    peak_memory_gib=peak_memory_bytes(self.device) / 2**30,
                    **self.optimizer_metrics(),
                )
            if self.step % run.eval_interval == 0 or last:
                val_loss = self.evaluate()
                record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
            if len(record) > 1:
                summary.update(record)
                if self.logger is not None:
                    self.logger.log(record)
            if progress is not None:
                progress.update(1)
            if self.step % run.checkpoint_interval == 0 or last:
                self.save_checkpoint()
        if self.logger is not None:
            self.logger.close()
            progress.close()
        return summary

