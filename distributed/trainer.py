"""One data-parallel worker's training loop around a DeepSpeed engine.

Runs inside a process whose process group is already initialized (see `distributed.worker`).
`train_step` reads as named steps: a curvature estimate when the optimizer says one is due,
micro-batches of forward/backward, the engine's optimizer step at the accumulation boundary, where
the distributor (chosen once, `distributed.distributor`) reduces, updates and returns. The loss stays
on the device between log intervals (no host sync in the hot loop); logging, evaluation (`Validator`)
and checkpoints (`Checkpointer`) are gated by their intervals.
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

from curvtrain.distributed.checkpointer import Checkpointer
from curvtrain.distributed.config import TrainConfig, config_to_dict
from curvtrain.distributed.distributor import StepClosure, build_distributor, sum_over_ranks
from curvtrain.distributed.engine import build_engine, build_model_and_optimizer
from curvtrain.distributed.health import Diverged, Health
from curvtrain.distributed.metrics import MetricsLogger, peak_memory_bytes
from curvtrain.distributed.progress import progress_bar
from curvtrain.distributed.validator import Validator
from curvtrain.models.data import TokenData
from curvtrain.models.llama import causal_lm_loss
from curvtrain.optim import warmup_cosine
from curvtrain.optim.curvature import gnb_diag, hutchinson_diag


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, device: torch.device, owners: dict[str, int] | None = None):
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.step = 0  # optimizer steps completed
        self.tokens = 0  # training tokens consumed by all workers

        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model, self.rule = build_model_and_optimizer(cfg, device)  # the update rule itself (optim/)
        self.needs = cfg.optimizer.needs  # what it asks of this loop (optim.registry.Needs)
        if cfg.model.compile:
            model.compile()  # in place: parameter names stay HF-compatible for checkpoints and export
        self.distributor = build_distributor(cfg, model, self.rule, owners)
        # the schedule is made on the optimizer DeepSpeed ends up with: the rule, or its own (deepspeed_muon)
        self.engine = build_engine(model, self.distributor, lambda built: warmup_cosine(built, cfg.schedule), cfg)
        self.data = TokenData.from_config(cfg.data)  # a cache hit: the coordinator prepared the tokens
        self.checkpointer = Checkpointer(cfg, run_dir, self.engine, self.distributor)
        self.validator = Validator(cfg, self.engine, self.data, device)
        self.logger: MetricsLogger | None = None  # opened by fit(), at the step it starts from
        self.health = Health(cfg.run.max_skipped_steps, device)  # non-finite loss/weights, skipped steps

    # ---- state (everything a resume needs besides the engine and the optimizer) ----
    def state_dict(self) -> dict:
        state = {"step": self.step, "tokens": self.tokens, "rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])

    def save_checkpoint(self) -> Path:
        return self.checkpointer.save(self.step, self.state_dict())

    def load_checkpoint(self, ckpt: Path) -> None:
        self.load_state_dict(self.checkpointer.load(ckpt))

    # ---- the step ----
    def train_step(self) -> torch.Tensor:
        """One optimizer step over the global batch; returns this rank's mean micro-batch loss (on device)."""
        accum = self.cfg.grad_accum
        estimated: list[torch.Tensor] = []  # losses of the micro-batches whose gradient the estimate pass took
        if self.needs.estimate is not None and self.needs.estimate.due(self.step):
            estimated = self.estimate_curvature()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            if micro < len(estimated):
                loss = estimated[micro]  # its gradient is in p.grad already
            else:
                inputs, targets = self.micro_batch(micro)
                loss = self.engine(inputs, targets)
                self.engine.backward(loss)  # DeepSpeed scales by 1/grad_accum; the distributor reduces at the boundary
            loss_sum += loss.detach().float()
            if micro == accum - 1 and self.needs.closure:
                self.distributor.closure = StepClosure(self.local_batch_closure(), loss_sum / accum)
            self.engine.step()  # optimizer + LR step only at the accumulation boundary
        self.step += 1
        self.tokens += self.cfg.batch.global_batch_size * self.cfg.data.seq_len
        return loss_sum / accum

    def micro_batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of this rank's micro-batch `micro` of the current step, on the device."""
        b = self.cfg.batch
        inputs, targets = self.data.train_batch(self.step, micro, self.rank, self.world_size, b.micro_batch_size, self.cfg.grad_accum)
        return inputs.to(self.device), targets.to(self.device)

    def estimate_curvature(self) -> list[torch.Tensor]:
        """The optimizer's curvature estimate (registry `Estimate`) on this step's first micro-batches,
        taken on engine.module through torch.autograd.grad, so that neither DeepSpeed's gradient buffers
        nor per-layer hooks see it; the mean over all workers' micro-batches is reduced to each block's
        owner by the distributor and handed to the rule there (`update_hessian(estimates)`). Each micro-batch draws its labels (GNB) or
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
        self.rule.update_hessian(self.distributor.reduce_estimates(params, total, scale=1 / (count * self.world_size)))
        for p, g in zip(params, grads):
            p.grad = g.div_(accum)
        return losses

    def local_batch_closure(self) -> Callable[[], torch.Tensor]:
        """For rules that re-evaluate the step's batch (registry `closure`): this rank's mean loss over its
        micro-batches of the step at the current weights, their gradients (scaled as engine.backward
        scales them) left in p.grad, taken through torch.autograd.grad on engine.module; the distributor
        reduces them (`StepClosure`)."""
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
                p.grad = g
            return loss_sum

        return closure

    def optimizer_metrics(self) -> dict[str, float]:
        """The update rule's own statistics (registry `metrics`: Sophia's win rate, GNS's γ): its
        (numerator, denominator) sums of this rank's blocks, added up over all ranks in one all-reduce."""
        if not self.needs.metrics:
            return {}
        metrics = self.rule.metrics()
        if not metrics:
            return {}
        pairs = torch.stack([torch.stack([num, den]).to(self.device, torch.float64) for num, den in metrics.values()])
        dist.all_reduce(pairs)
        return dict(zip(metrics, (pairs[:, 0] / pairs[:, 1]).tolist()))

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
            self.health.observe(self.step, loss, self.engine)  # on the device: no host sync
            last = self.step == max_steps
            record: dict = {"step": self.step}
            if self.step % run.log_interval == 0 or last:
                record.update(
                    loss=sum_over_ranks(loss).item() / self.world_size,
                    lr=lr,
                    tokens=self.tokens,
                    tokens_per_s=(self.tokens - start_tokens) / max(time.perf_counter() - start, 1e-9),
                    elapsed_s=time.perf_counter() - start,
                    peak_memory_gib=peak_memory_bytes(self.device) / 2**30,
                    skipped_steps=self.engine.skipped_steps,
                    **self.optimizer_metrics(),
                )
            seal = self.step % run.checkpoint_interval == 0 or last
            if (len(record) > 1 or seal) and (problem := self.health.problem(self.step, self.engine, weights=seal)):
                if self.logger is not None:  # the record of the step that failed, then stop on every rank
                    self.logger.log(record)
                    self.logger.close()
                raise Diverged(problem)
            if self.step % run.eval_interval == 0 or last:
                val_loss = self.validator.evaluate()
                record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
            if len(record) > 1:
                summary.update(record)
                if self.logger is not None:
                    self.logger.log(record)
            if progress is not None:
                progress.update(1)
            if seal:
                self.save_checkpoint()
        if self.logger is not None:
            self.logger.close()
            progress.close()
        return summary

