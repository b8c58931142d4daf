"""The typed configuration of a pretraining run.

Each layer owns its own section (`models.data.DataConfig`, `optim.OptimizerConfig`, ...); this module
composes them and checks the combinations no single section can see (batch divisibility, precision
on the device, ...). `launcher.config` turns YAML and `--set` overrides into this dataclass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from curvtrain.distributed.distributor import distributor_for
from curvtrain.distributed.metrics import WandbConfig
from curvtrain.models.data import DataConfig
from curvtrain.models.llama import LLAMA_CONFIGS
from curvtrain.optim import OptimizerConfig, ScheduleConfig

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's placement group strategies


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "20m"
    """Named LLaMA shape from models.llama.LLAMA_CONFIGS (tiny, 20m, 60m, 130m, 350m, 1b, 7b; nano, nano-4m)."""
    vocab_size: int = 0
    """Rows of the embedding and output head; 0 takes the vocabulary of data.tokenizer (a larger value pads it)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward (saves memory, costs ~30% more compute)."""
    compile: bool = False
    """torch.compile the model in place (state-dict names unchanged); pays a compile at start-up."""
    weights: str = "dense"
    """"dense" (every weight in engine.precision) or "int8": the matrices the optimizer updates whole
    (its `Needs.int8_targets`) held as INT8 weights (optim.int8), trained with stochastic rounding."""

    def __post_init__(self):
        if self.weights not in ("dense", "int8"):
            raise ValueError(f"weights must be 'dense' or 'int8', got {self.weights!r}")
        if self.name not in LLAMA_CONFIGS:
            raise ValueError(f"name must be one of {sorted(LLAMA_CONFIGS)}, got {self.name!r}")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size must be ≥ 0 (0: the tokenizer's), got {self.vocab_size}")


@dataclass(kw_only=True)
class BatchConfig:
    global_batch_size: int = 16
    """Sequences per optimizer step over all workers; fixed when the worker count changes."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one worker; gradient accumulation makes up the rest."""

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be ≥ 1, got {self.micro_batch_size}")
        if self.global_batch_size < self.micro_batch_size:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) must be ≥ micro_batch_size ({self.micro_batch_size})")


@dataclass(kw_only=True)
class EngineConfig:
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+gradients), 3 (+parameters)."""
    precision: str = "fp32"
    """"fp32" or "bf16": bf16 weights and activations; fp32 master weights under ZeRO (DeepSpeed's bf16
    optimizer), none on the owner distributor (fp32 state, stochastically rounded updates)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    bucket_mb: float = 25.0
    """Owner-distributed runs: size cap (MiB) of the buckets in which gradients travel to their owners and
    updated weights come back (DDP's bucket_cap_mb); with per-layer updates, the unit of overlap with backward."""

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be ≥ 0, got {self.grad_clip}")
        if not self.bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {self.bucket_mb}")


@dataclass(kw_only=True)
class WorkersConfig:
    num_workers: int = 2
    """Data-parallel workers (Ray actors), one process each."""
    use_gpu: bool = False
    """One GPU per worker and NCCL; otherwise CPU and gloo."""
    cpus_per_worker: int = 1
    """CPU cores reserved for (and torch threads used by) each worker."""
    min_workers: int | None = None
    """Elastic runs: when a lost node leaves the cluster unable to place num_workers, restart from the last
    checkpoint with as many workers as it holds, down to this many (the global batch kept; see
    distributed.coordinator). None (the default): num_workers, not elastic."""
    max_restarts: int = 2
    """How often a worker group that lost a worker is restarted from the last checkpoint."""
    placement: str = "PACK"
    """How the workers' placement group spreads over the cluster's nodes (all workers start or none):
    "PACK" (fewest nodes: GPU workers share a node's fast links), "SPREAD" (one per node where possible),
    "STRICT_PACK" (one node or fail), "STRICT_SPREAD" (a node each or fail). See distributed.placement."""

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be ≥ 1, got {self.num_workers}")
        if self.min_workers is None:
            self.min_workers = self.num_workers
        if not 1 <= self.min_workers <= self.num_workers:
            raise ValueError(f"min_workers must be from 1 to num_workers ({self.num_workers}), got {self.min_workers}")
        if self.cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker must be ≥ 1, got {self.cpus_per_worker}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be ≥ 0, got {self.max_restarts}")
        if self.placement not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENT_STRATEGIES)}, got {self.placement!r}")


@dataclass(kw_only=True)
class CheckpointedRunConfig:
    """What a pretraining run and a federated run share: a seed, the cadence of evaluations and checkpoints
    (in steps or in rounds), and how many checkpoints are kept."""

    seed: int = 0
    """Seeds the initial model (federated: the client sampling too; pretraining's data order is seeded by data.seed)."""
    eval_interval: int
    """Steps (rounds) between evaluations, and at the last one."""
    checkpoint_interval: int
    """Steps (rounds) between checkpoints, and at the last one."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept in RUN_DIR/checkpoints; older ones are deleted."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Mirror the metrics to Weights & Biases (run.wandb.project names the project)."""

    def __post_init__(self):
        for name in ("eval_interval", "checkpoint_interval", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class RunConfig(CheckpointedRunConfig):
    log_interval: int = 1
    """Steps between metrics records (each costs one all-reduce and one host sync)."""
    eval_interval: int = 50
    eval_samples: int = 64
    """Validation sequences per pass (the first ones of the held-out split)."""
    checkpoint_interval: int = 100
    max_skipped_steps: int = 10
    """Steps DeepSpeed may skip for non-finite gradients (ZeRO's overflow check) before the run fails as
    diverged (distributed.health); 0 fails on the first."""

    def __post_init__(self):
        super().__post_init__()
        for name in ("log_interval", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be ≥ 0, got {self.max_skipped_steps}")


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        per_step = self.batch.micro_batch_size * self.workers.num_workers
        if self.batch.global_batch_size % per_step:
            raise ValueError(
                f"batch.global_batch_size ({self.batch.global_batch_size}) must be a multiple of "
                f"batch.micro_batch_size × workers.num_workers ({per_step})"
            )

        if self.run.eval_samples < per_step:
            raise ValueError(
                f"run.eval_samples ({self.run.eval_samples}) must be ≥ batch.micro_batch_size × workers.num_workers "
                f"({per_step}): every worker evaluates at least one micro-batch"
            )
        distributor_for(self).check_config(self)
        if self.optimizer.name == "deepspeed_muon" and self.engine.grad_clip > 0:
            raise ValueError(
                "optimizer.name=deepspeed_muon: DeepSpeed's ZeRO 1-2 write Muon's orthogonalized update into the gradient "
                "partitions before clipping, so engine.grad_clip would shrink the update itself: set engine.grad_clip=0"
            )
        self.check_needs()
        if self.model.weights == "int8" and (self.optimizer.needs.int8_targets is None or self.model.compile):
            raise ValueError(f"model.weights=int8 needs an optimizer that writes its matrices whole (apollo, apollo_mini, "
                             f"gradnorm_lorp; got optimizer.name={self.optimizer.name}) and model.compile=false")

    def check_needs(self) -> None:
        """The combinations the optimizer's registry entry rules out (optim.registry.Needs)."""
        name, needs = self.optimizer.name, self.optimizer.needs
        if self.engine.zero_stage not in needs.zero_stages:
            raise ValueError(f"optimizer.name={name} supports engine.zero_stage in {list(needs.zero_stages)}, got {self.engine.zero_stage}")
        if self.optimizer.per_layer and not needs.per_layer:
            why = "its step re-evaluates the batch" if needs.closure else "its update is not per parameter inside backward"
            raise ValueError(f"optimizer.per_layer is not supported by optimizer.name={name} ({why}): set optimizer.per_layer=false")
        if needs.closure and self.engine.grad_clip > 0:
            raise ValueError(
                f"optimizer.name={name} re-evaluates its own gradients through a closure, which global clipping "
                f"does not reach: set engine.grad_clip=0"
            )
        if needs.estimate is not None:
            field = f"optimizer.{name}"
            if needs.estimate.micro_batches > self.grad_accum:
                raise ValueError(
                    f"{field}.micro_batches ({needs.estimate.micro_batches}) must be ≤ the micro-batches per worker "
                    f"and step, batch.global_batch_size / (batch.micro_batch_size × workers.num_workers) = {self.grad_accum}"
                )
            if needs.estimate.estimator == "hutchinson" and needs.estimate.method == "autograd" and self.model.compile:
                raise ValueError(
                    f"{field}.method=autograd differentiates twice, which a torch.compile'd model does not support: "
                    f"set {field}.method=finite_difference or model.compile=false"
                )

    @property
    def grad_accum(self) -> int:
        return self.batch.global_batch_size // (self.batch.micro_batch_size * self.workers.num_workers)


def config_to_dict(cfg) -> dict:
    """A resolved config as plain YAML-able data (tuples become lists)."""
    import dataclasses

    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg, path) -> None:
    import yaml
    from pathlib import Path

    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
