"""The interface of a distributor: what differs between the ways optimizer state is spread over workers.

Everything a distributor decides before any worker starts is a class method on the config (the DeepSpeed
config it asks for, its checks, the ownership plan, whether a checkpoint fits this run), so the
coordinator can refuse bad input before Ray starts; in each worker an instance wraps one update rule
(`optim/`, pure torch) and carries the step's three stages.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvtrain.distributed.checkpoint import CheckpointError

if TYPE_CHECKING:
    from curvtrain.distributed.config import TrainConfig

OPTIMIZER_SHARD = "optimizer_rank{}.safetensors"
"""A rank's own optimizer-state file in a checkpoint folder, where DeepSpeed does not write one: the state of
the parameters it owns, by name (`param_state`)."""


def sum_over_ranks(value: Tensor) -> Tensor:
    """`value` (detached, a copy) summed over all ranks: the one scalar reduction of the loop and the distributors."""
    value = value.detach().clone()
    torch.distributed.all_reduce(value)
    return value


@dataclass
class StepClosure:
    """What an update rule that re-evaluates its batch (registry `Needs.closure`) gets from the loop.

    `evaluate()`: this rank's mean loss over its micro-batches of the step at the current weights, with
    their gradients (scaled as `engine.backward` scales them) left in p.grad, unreduced. `loss`: the same
    loss at the step's start weights, from the loop's own pass, whose gradients are in p.grad when the
    step runs: the rule's first point costs nothing more."""

    evaluate: Callable[[], Tensor]
    loss: Tensor


class Distributor(ABC):
    """How one run spreads optimizer state; `distributed.distributor.distributor_for(cfg)` picks the class."""

    name: str
    """Written into each checkpoint's manifest: a checkpoint loads only under the distributor that wrote it."""

    # ---- before any worker starts ----
    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        """Raise ValueError naming the fields that this way of distributing cannot run."""

    @classmethod
    def engine_config(cls, cfg: TrainConfig) -> dict:
        """The DeepSpeed JSON config for this run (batch geometry, ZeRO stage, precision, clipping)."""
        zero: dict = {"stage": cfg.engine.zero_stage}
        if cfg.engine.zero_stage == 3:
            # Partition every parameter, norms included: the same layout at every model size.
            zero["stage3_param_persistence_threshold"] = 0
        return {
            "train_batch_size": cfg.batch.global_batch_size,
            "train_micro_batch_size_per_gpu": cfg.batch.micro_batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.engine.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": cfg.engine.precision == "bf16"},
            # Our optimizers are plain torch.optim.Optimizer subclasses that DeepSpeed wraps as client optimizers.
            "zero_allow_untested_optimizer": True,
            # DeepSpeed's own optimizer where the registry says so (deepspeed_muon); else ours is the client's.
            **({"optimizer": section} if (section := cfg.optimizer.deepspeed_section) else {}),
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }

    @classmethod
    def plan(cls, model: torch.nn.Module, rule: torch.optim.Optimizer, cfg: TrainConfig) -> dict[str, int] | None:
        """Which rank owns which parameter ({name: rank}), made once by the coordinator on a meta-device
        model; None where nobody owns whole parameters."""
        return None

    @classmethod
    def check_checkpoint(cls, manifest: dict, ckpt: Path, cfg: TrainConfig) -> None:
        """Raise checkpoint.CheckpointError naming the mismatch if checkpoint `ckpt` (its `manifest`) cannot
        be resumed by this run."""
        written_by = manifest.get("distributor", cls.name)
        if written_by != cls.name:
            raise CheckpointError(
                f"checkpoint {ckpt} holds {written_by}-distributed optimizer state; this run distributes it as "
                f"{cls.name} (optimizer.name={cfg.optimizer.name}, optimizer.per_layer={cfg.optimizer.per_layer})"
            )
        if manifest["zero_stage"] != cfg.engine.zero_stage:
            raise CheckpointError(
                f"checkpoint {ckpt} was written with ZeRO stage {manifest['zero_stage']}, this run uses "
                f"engine.zero_stage={cfg.engine.zero_stage}"
            )

    @classmethod
    def prepare_resume(cls, manifest: dict, ckpt: Path, cfg: TrainConfig) -> None:
        """Before the workers start on checkpoint `ckpt` (checked: `check_checkpoint`), make what they will
        load from it at this run's worker count."""

    # ---- in a worker ----
    client_optimizer: torch.optim.Optimizer
    """What the DeepSpeed engine steps at each accumulation boundary (its param groups are the rule's, so
    the LR schedule acts on the rule)."""
    closure: StepClosure | None = None
    """Set by the loop before the boundary for a rule that re-evaluates its batch."""

    def attach(self, engine) -> None:
        """Called once the DeepSpeed engine exists (before any step)."""

    @abstractmethod
    def reduce_estimates(self, params: Sequence[Tensor], estimates: Sequence[Tensor], scale: float) -> dict[Tensor, Tensor]:
        """Curvature estimates, one per parameter (this rank's sum, consumed), summed over ranks and
        scaled by `scale` where the rule needs them: {parameter: estimate} of the blocks this rank updates."""

    @abstractmethod
    def save(self, engine, ckpt: Path) -> None:
        """Write this rank's engine and optimizer files into checkpoint folder `ckpt`."""

    @abstractmethod
    def load(self, engine, ckpt: Path) -> None:
        """Load this rank's engine and optimizer state from checkpoint folder `ckpt`."""
