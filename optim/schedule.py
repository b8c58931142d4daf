"""Learning-rate schedule: linear warmup, then cosine decay to a floor (GaLore / nanoGPT recipe)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class ScheduleConfig:
    max_steps: int = 200
    """Optimizer steps in the whole run."""
    warmup_steps: int = 20
    """Linear warmup from 0 to the peak learning rate."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine decay as a fraction of the peak (GaLore: 0.1)."""

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be ≥ 1, got {self.max_steps}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def lr_factor(step: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr for the update taken at `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def warmup_cosine(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
