"""The one choice point from an optimizer config to an implementation.

`build_optimizer(cfg, named_parameters)` returns a plain `torch.optim.Optimizer` over local tensors;
`distributed/` decides where it runs and wraps it (DeepSpeed engine, block ownership).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from curvtrain.optim.gradnorm_lorp import LLAMA_TARGETS, LOWRANK_DEFAULTS, GradNormLoRP, lowrank_param_groups
from curvtrain.optim.projector import METHODS



NamedParams = Iterable[tuple[str, nn.Parameter]]


@dataclass(kw_only=True)
class LowRankConfig:
    """Low-rank gradient projection (GaLore family); used by `gradnorm_lorp`."""

    rank: int = 128
    """Projection rank r (GaLore: 128 for 60M, 256 for 130M/350M, 512-1024 for 1B, 1024 for 7B)."""
    update_gap: int = LOWRANK_DEFAULTS["update_gap"]
    """T: steps between refreshes of the projection basis (GaLore default 200)."""
    scale: float = LOWRANK_DEFAULTS["scale"]
    """α: scale of the back-projected update (GaLore default 0.25)."""
    proj_side: str = "auto"
    """"auto" (right basis if m ≥ n, else left), "left" or "right"."""
    power_iters: int = 1
    """Power iterations of the randomized range finder at each refresh."""
    proj_method: str = LOWRANK_DEFAULTS["proj_method"]
    """How the basis is refreshed: "range_finder" (sketch + QR) or "svd" (GaLore's full SVD, for comparison)."""
    targets: str = LLAMA_TARGETS
    """Regular expression on parameter names selecting the projected 2-D weights."""
    eight_bit: bool = False
    """Hold the low-rank Adam moments in blockwise 8-bit."""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {self.rank}")
        if self.update_gap < 1:
            raise ValueError(f"update_gap must be ≥ 1, got {self.update_gap}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.proj_side not in ("auto", "left", "right"):
            raise ValueError(f"proj_side must be 'auto', 'left' or 'right', got {self.proj_side!r}")
        if self.power_iters < 0:
            raise ValueError(f"power_iters must be ≥ 0, got {self.power_iters}")
        if self.proj_method not in METHODS:
            raise ValueError(f"proj_method must be one of {METHODS}, got {self.proj_method!r}")


@dataclass(kw_only=True)
class OptimizerConfig:
    name: str = "adamw"
    """Registry key: one of OPTIMIZERS."""
    lr: float = 3e-3
    """Peak learning rate (the schedule multiplies it)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to 2-D weights only (not norms)."""
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    per_layer: bool = False
    """Step each parameter inside backward and free its gradient at once (GaLore's per-layer updates):
    whole-model gradients never coexist. Excludes global-norm clipping."""

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"name must be one of {sorted(OPTIMIZERS)}, got {self.name!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {self.weight_decay}")


def decay_groups(named_params: NamedParams, weight_decay: float) -> list[dict]:
    """Two groups: matrices get weight decay, vectors (norm gains) do not (nanoGPT's rule). A parameter that
    DeepSpeed's ZeRO-3 partitioned at construction (`deepspeed.zero.Init`) is flat; its shape is in `ds_shape`."""
    params = [(n, p) for n, p in named_params if p.requires_grad]
    matrix = {p: len(getattr(p, "ds_shape", p.shape)) >= 2 for _, p in params}
    return [
        {"params": [p for _, p in params if matrix[p]], "weight_decay": weight_decay},
        {"params": [p for _, p in params if not matrix[p]], "weight_decay": 0.0},
    ]


def build_adamw(cfg: OptimizerConfig, named_params: NamedParams) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019): the baseline."""
    return torch.optim.AdamW(decay_groups(named_params, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_gradnorm_lorp(cfg: OptimizerConfig, named_params: NamedParams) -> torch.optim.Optimizer:
    """GradNormLoRP on the `lowrank.targets` matrices, AdamW on the rest (optim.gradnorm_lorp)."""
    lr = cfg.lowrank
    groups = lowrank_param_groups(
        ((n, p) for n, p in named_params if p.requires_grad), targets=lr.targets, rank=lr.rank,
        update_gap=lr.update_gap, scale=lr.scale, proj_side=lr.proj_side, power_iters=lr.power_iters,
        proj_method=lr.proj_method, weight_decay=cfg.weight_decay,
    )
    return GradNormLoRP(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, eight_bit=lr.eight_bit)


def build_galore_adamw(cfg: OptimizerConfig, named_params: NamedParams) -> torch.optim.Optimizer:
    """galore-torch's GaLoreAdamW (Zhao et al., ICML 2024) on the same targets and rank: the published
    baseline, for comparisons. Its state holds Python projector objects, so its checkpoints save but
    cannot be resumed (weights-only loading refuses them)."""
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as e:
        raise ValueError("optimizer galore_adamw needs the galore-torch package: pip install -e .[bench]") from e
    lr = cfg.lowrank
    groups = lowrank_param_groups(
        ((n, p) for n, p in named_params if p.requires_grad), targets=lr.targets, rank=lr.rank,
        update_gap=lr.update_gap, scale=lr.scale, weight_decay=cfg.weight_decay,
    )
    for group in groups:
        if "rank" in group:  # galore-torch's names for the same options
            group.update(update_proj_gap=group["update_gap"], proj_type="std")
    return GaLoreAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


OPTIMIZERS: dict[str, Callable[[OptimizerConfig, NamedParams], torch.optim.Optimizer]] = {
    "adamw": build_adamw,
    "gradnorm_lorp": build_gradnorm_lorp,
    "galore_adamw": build_galore_adamw,
}

# Optimizers whose update needs each matrix whole (2-D projections): under data parallelism they run
# on owner-sharded whole matrices (distributed.sharded), never on DeepSpeed ZeRO's flat partitions.
WHOLE_MATRIX = {"gradnorm_lorp", "galore_adamw"}


def build_optimizer(cfg: OptimizerConfig, named_params: NamedParams) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](cfg, named_params)
