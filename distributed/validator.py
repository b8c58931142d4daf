"""Validation loss of the model being trained: the first `run.eval_samples` held-out sequences, all ranks
together (each rank evaluates its share, the sums are all-reduced)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from curvtrain.distributed.config import TrainConfig
from curvtrain.models.data import TokenData


class Validator:
    def __init__(self, cfg: TrainConfig, engine, data: TokenData, device: torch.device):
        self.cfg, self.engine, self.data, self.device = cfg, engine, data, device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss per token over the held-out sequences."""
        self.engine.eval()
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)
        for inputs, targets in self.data.val_batches(
            self.cfg.batch.micro_batch_size, self.rank, self.world_size, self.cfg.run.eval_samples
        ):
            loss = self.engine(inputs.to(self.device), targets.to(self.device))
            totals[0] += loss.double() * targets.numel()
            totals[1] += targets.numel()
        dist.all_reduce(totals)
        self.engine.train()
        return (totals[0] / totals[1]).item()
