"""One data-parallel worker's training loop around a DeepSpeed engine.

Runs inside a process whose process group is already initialized (see `distributed.worker`).
`train_step` reads as named steps: micro-batches of forward/backward, the engine's optimizer step at
the accumulation boundary. The loss stays on the device between log intervals (no host sync in the
hot loop); logging, evaluation and checkpoints are gated by their intervals.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from curvtrain.distributed import checkpoint
from curvtrain.distributed.config import TrainConfig, save_config
from curvtrain.distributed.engine import build_engine, param_dtype, zero3_partitioner
from curvtrain.distributed.metrics import MetricsLogger, peak_memory_bytes
from curvtrain.distributed.sharded import OwnerShardedOptimizer
from curvtrain.models.data import TokenData
from curvtrain.models.llama import LlamaForCausalLM, build_llama, llama_config
from curvtrain.optim import attach_per_layer_step, build_optimizer, warmup_cosine


def build_model_and_optimizer(cfg: TrainConfig, device: torch.device) -> tuple[LlamaForCausalLM, torch.optim.Optimizer]:
    """The model materialized on `device` in the run's dtype, and the registry's optimizer over it.

    The weights are those of `LlamaForCausalLM` built in float32 after the global seed, cast to the run's dtype
    (`build_llama`), but no float32 copy of the model is ever held: bf16 runs hold bf16 weights (owner-sharded
    ones train them as they are, GaLore's recipe; DeepSpeed's bf16 keeps its own fp32 master partitions), and
    under ZeRO-3 each rank keeps only its partition of each parameter from the moment it is drawn. On the meta
    device nothing is drawn (the coordinator plans block ownership there).
    """
    place = zero3_partitioner(cfg) if device.type != "meta" else None
    model = build_llama(llama_config(cfg.model.name), dtype=param_dtype(cfg), device=device, place=place)
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
        if cfg.owner_sharded:
            names = {p: n for n, p in model.named_parameters()}
            optimizer = OwnerShardedOptimizer(optimizer, owners, names, per_layer=cfg.optimizer.per_layer)
            if cfg.optimizer.per_layer:
                attach_per_layer_step(model, optimizer, accumulation_steps=cfg.grad_accum)
        if cfg.model.compile:
            model.compile()  # in place: parameter names stay HF-compatible for checkpoints and export
        self.optimizer = optimizer
        self.engine = build_engine(model, optimizer, warmup_cosine(optimizer, cfg.schedule), cfg)
        self.data = TokenData.from_config(cfg.data)  # a cache hit: the coordinator prepared the tokens
        self.logger = MetricsLogger(self.run_dir) if self.rank == 0 else None

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
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            inputs, targets = self.data.train_batch(
                self.step, micro, self.rank, self.world_size, cfg.batch.micro_batch_size, cfg.grad_accum
            )
            loss = self.engine(inputs.to(self.device), targets.to(self.device))
            self.engine.backward(loss)  # DeepSpeed scales by 1/grad_accum and reduces at the boundary
            self.engine.step()  # optimizer + LR step only at the accumulation boundary
            loss_sum += loss.detach().float()
        self.step += 1
        self.tokens += cfg.batch.global_batch_size * cfg.data.seq_len
        return loss_sum / cfg.grad_accum

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
        root = self.run_dir / "checkpoints"
        tag = checkpoint.tag_for(self.step)
        self.engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        torch.save(self.state_dict(), root / tag / f"trainer_rank{self.rank}.pt")
        if self.cfg.owner_sharded:  # DeepSpeed (ZeRO 0) saves rank 0's optimizer only; each rank owns a shard
            torch.save(self.optimizer.state_dict(), root / tag / f"optimizer_rank{self.rank}.pt")
        if self.rank == 0:
            save_config(self.cfg, root / tag / "config.yaml")
        dist.barrier()  # every rank's files are on disk before the manifest seals them
        if self.rank == 0:
            checkpoint.write_manifest(root / tag, step=self.step, world_size=self.world_size, zero_stage=self.cfg.engine.zero_stage)
            checkpoint.prune(root, self.cfg.run.keep_checkpoints)
        dist.barrier()
        return root / tag

    def load_checkpoint(self, ckpt_dir: Path) -> None:
        ckpt_dir = Path(ckpt_dir)
        sharded = self.cfg.owner_sharded
        path, _ = self.engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=not sharded)
        if path is None:
            raise checkpoint.CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir}")
        self.load_state_dict(torch.load(ckpt_dir / f"trainer_rank{self.rank}.pt", weights_only=True))
        if sharded:
            self.optimizer.load_state_dict(torch.load(ckpt_dir / f"optimizer_rank{self.rank}.pt", weights_only=True))

    # ---- the loop ----
    def fit(self) -> dict:
        run, max_steps = self.cfg.run, self.cfg.schedule.max_steps
        progress = _progress_bar(self.step, max_steps) if self.rank == 0 else None
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


def _progress_bar(initial: int, total: int):
    """A progress bar that the Ray driver renders (tqdm_ray), or plain tqdm outside Ray."""
    try:
        import ray
        from ray.experimental import tqdm_ray

        if ray.is_initialized():
            bar = tqdm_ray.tqdm(total=total, desc="train", unit="step")
            bar.update(initial)
            return bar
    except ImportError:
        pass
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step")
