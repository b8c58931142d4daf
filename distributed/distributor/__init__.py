"""How optimizer state is spread over the workers: one `Distributor`, chosen once per run from the config
and the optimizer's registry `Needs` (`distributor_for`); the trainer calls it and never branches on it.

One optimizer step, in three stages (Distributed Shampoo's shape):

       rank 0                 rank 1               every rank: forward/backward of its micro-batches
         │ grads, estimates     │
    1. reduce ──────────────────┴──→ to where they are needed: each block's owner (OwnerDistributor:
         │                             dist.reduce in buckets), or DeepSpeed's flat partitions (ZeroDistributor)
    2. update                          the optim/ rule, pure torch, on the blocks this rank holds
         │
    3. return ──────────────────┬──→ updated weights to every rank (broadcast from owners / ZeRO's gather)

- `ZeroDistributor` (zero.py): DeepSpeed ZeRO 0-3 does all three on flat partitions (AdamW, SGD).
- `OwnerDistributor` (owner.py): whole parameters on owners (GradNormLoRP, galore_adamw, Sophia,
  AdaHessian, M-FAC; any rule with `optimizer.per_layer`), at DDP's communication volume.

Before any worker starts, the coordinator asks the chosen class for its checks, its DeepSpeed config, the
ownership plan and whether a checkpoint fits this run; in each worker an instance wraps the rule.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from curvtrain.distributed.distributor.base import OPTIMIZER_SHARD, Distributor, StepClosure, sum_over_ranks
from curvtrain.distributed.distributor.owner import OwnerDistributor
from curvtrain.distributed.distributor.zero import ZeroDistributor

if TYPE_CHECKING:
    from curvtrain.distributed.config import TrainConfig

__all__ = ["OPTIMIZER_SHARD", "Distributor", "OwnerDistributor", "StepClosure", "ZeroDistributor", "build_distributor",
           "distributor_for", "sum_over_ranks"]


def distributor_for(cfg: TrainConfig) -> type[Distributor]:
    """The one choice: whole blocks on owners where the rule needs them whole or is stepped per layer
    (its gradients are freed inside backward, before any all-reduce could see them), else ZeRO."""
    needs = cfg.optimizer.needs
    return OwnerDistributor if needs.whole_blocks or cfg.optimizer.per_layer else ZeroDistributor


def build_distributor(cfg: TrainConfig, model: torch.nn.Module, rule: torch.optim.Optimizer,
                      owners: dict[str, int] | None) -> Distributor:
    """This worker's distributor around `rule` (the registry's optimizer over `model`)."""
    return distributor_for(cfg)(cfg, model, rule, owners)
