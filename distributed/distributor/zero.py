"""DeepSpeed ZeRO as a distributor: for update rules that work on flat partitions (AdamW, SGD).

DeepSpeed carries all three stages itself: at stage 0 every rank all-reduces the gradients and steps the
whole model (plain data parallelism); at stages 1-3 the optimizer state (1), gradients (2) and weights
(3) are partitioned flat across ranks, gradients reduce-scattered and weights all-gathered.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from curvtrain.distributed.checkpoint import CheckpointError

from curvtrain.distributed.distributor.base import Distributor


class ZeroDistributor(Distributor):
    name = "zero"

    @classmethod
    def check_checkpoint(cls, manifest: dict, ckpt: Path, cfg) -> None:
        super().check_checkpoint(manifest, ckpt, cfg)
        if manifest["zero_stage"] > 0 and manifest["world_size"] != cfg.workers.num_workers:
            raise CheckpointError(
                f"checkpoint {ckpt} was written by {manifest['world_size']} workers; resuming it needs "
                f"workers.num_workers={manifest['world_size']} (ZeRO stage {manifest['zero_stage']} shards the "
                f"optimizer state per worker, and it is not resharded)"
            )

    def __init__(self, cfg, model: torch.nn.Module, rule: torch.optim.Optimizer, owners: None = None):
        self.client_optimizer = rule

    def reduce_estimates(self, params: Sequence[Tensor], estimates: Sequence[Tensor], scale: float) -> dict[Tensor, Tensor]:
        raise RuntimeError("a curvature estimate needs whole blocks: its optimizer runs on the owner distributor")

    def save(self, engine, ckpt: Path) -> None:
        # at stage 0 DeepSpeed writes rank 0's (every rank's identical) optimizer state with the model
        engine.save_checkpoint(str(ckpt.parent), tag=ckpt.name, save_latest=False)

    def load(self, engine, ckpt: Path) -> None:
        path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt}")
