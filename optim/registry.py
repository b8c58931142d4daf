"""The one choice point from an optimizer config to an implementation, and what that implementation
needs of the training loop.

`build_optimizer(cfg, named_parameters)` returns a plain `torch.optim.Optimizer` over local tensors;
`distributed/` decides where it runs and wraps it (DeepSpeed engine, block ownership). Each registry
entry also says what its optimizer needs (`Needs`: whole blocks, the ZeRO stages and per-layer
updates it supports, a curvature estimate every k steps, a closure), so the loop asks instead of
special-casing optimizer names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from curvtrain.optim.adahessian import AdaHessian
from curvtrain.optim.adamw import AdamW, decay_groups
from curvtrain.optim.apollo import APOLLO_DEFAULTS, APOLLO_MINI_DEFAULTS, Apollo, apollo_param_groups, check_apollo_options
from curvtrain.optim.curvature import METHODS as HVP_METHODS
from curvtrain.optim.gradnorm_lorp import (
    LLAMA_TARGETS, LOWRANK_DEFAULTS, GradNormLoRP, check_lowrank_options, is_lowrank, lowrank_param_groups,
)
from curvtrain.optim.mfac import MFAC
from curvtrain.optim.mfac import check_options as check_mfac_options
from curvtrain.optim.muon import ADJUST_LR_FNS, MUON_DEFAULTS, Muon, muon_param_groups
from curvtrain.optim.sophia import Sophia
from curvtrain.optim.state import check_betas


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
    proj_side: str = LOWRANK_DEFAULTS["proj_side"]
    """"auto" (right basis if m ≥ n, else left), "left" or "right"."""
    power_iters: int = LOWRANK_DEFAULTS["power_iters"]
    """Power iterations of the randomized range finder at each refresh."""
    proj_method: str = LOWRANK_DEFAULTS["proj_method"]
    """How the basis is refreshed: "range_finder" (sketch + QR) or "svd" (GaLore's full SVD, for comparison)."""
    targets: str = LLAMA_TARGETS
    """Regular expression on parameter names selecting the projected 2-D weights."""
    eight_bit: bool = False
    """Hold the low-rank Adam moments in blockwise 8-bit."""

    def __post_init__(self):
        check_lowrank_options(**self.group_options())

    def group_options(self) -> dict:
        """The options of the projected param group (`gradnorm_lorp.lowrank_param_groups`)."""
        return dict(rank=self.rank, **{k: getattr(self, k) for k in LOWRANK_DEFAULTS})


@dataclass(kw_only=True)
class EstimateConfig:
    """When and how the loop estimates the Hessian diagonal for a curvature optimizer (optim.curvature)."""

    every: int = 10
    """k: steps between curvature estimates (the first at step 0)."""
    micro_batches: int = 0
    """Micro-batches of the step's batch (per worker) the estimate runs on; 0 = all of them. With all of
    them the estimate does not depend on the worker count."""
    method: str = "autograd"
    """Hessian-vector products of Hutchinson: "autograd" (double backward; needs eager mode, the math
    attention kernel is selected for it) or "finite_difference" ((∇f(θ+εu) − ∇f(θ))/ε, any engine)."""

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"every must be ≥ 1, got {self.every}")
        if self.micro_batches < 0:
            raise ValueError(f"micro_batches must be ≥ 0 (0 = all), got {self.micro_batches}")
        if self.method not in HVP_METHODS:
            raise ValueError(f"method must be one of {HVP_METHODS}, got {self.method!r}")


ESTIMATORS = ("gnb", "hutchinson")


@dataclass(kw_only=True)
class SophiaConfig(EstimateConfig):
    """Sophia (optim.sophia); lr and weight_decay are optimizer.lr and optimizer.weight_decay."""

    betas: tuple[float, float] = (0.965, 0.99)
    """(β₁, β₂): EMA of the gradient and of the Hessian estimate (the official defaults)."""
    rho: float = 0.04
    """ρ: the clipping scale, update = clip(m / max(ρh, ε), 1), clipped on both sides."""
    eps: float = 1e-15
    """ε > 0: the floor of the denominator (where h ≤ 0 the update is a sign step)."""
    estimator: str = "gnb"
    """"gnb" (Gauss-Newton-Bartlett, Sophia-G) or "hutchinson" (Sophia-H)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.rho > 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        check_betas(self.betas)
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")


@dataclass(kw_only=True)
class AdaHessianConfig(EstimateConfig):
    """AdaHessian (optim.adahessian), Hutchinson estimates; lr and weight_decay are optimizer.lr and
    optimizer.weight_decay."""

    every: int = 1
    """k: steps between Hessian estimates (the official code: every step)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-4
    hessian_power: float = 1.0
    """k of (√v̂)^k in the denominator, in (0, 1]."""
    block_size: int = 32
    """Entries per block of the spatial averaging of |u ⊙ Hu|."""

    def __post_init__(self):
        super().__post_init__()
        check_betas(self.betas)
        if self.eps < 0:
            raise ValueError(f"eps must be ≥ 0, got {self.eps}")
        if not 0 < self.hessian_power <= 1:
            raise ValueError(f"hessian_power must be in (0, 1], got {self.hessian_power}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be ≥ 1, got {self.block_size}")


@dataclass(kw_only=True)
class MFACConfig:
    """Blockwise M-FAC (optim.mfac); lr and weight_decay are optimizer.lr and optimizer.weight_decay."""

    window: int = 32
    """m: gradients kept per block (memory: m × the block)."""
    damping: float | str = 1e-5
    """λ > 0, or "gns": λ = ‖g‖/γ with γ adapted by the Gradient-Normalized Smoothness acceptance rule,
    which re-evaluates the step's batch (use lr = 1, weight_decay = 0, engine.grad_clip = 0)."""
    momentum: float = 0.0
    block_size: int = 16384
    """Entries per block (each block has its own window and m × m Gram matrix)."""

    def __post_init__(self):
        check_mfac_options(window=self.window, damping=self.damping, momentum=self.momentum, block_size=self.block_size)


@dataclass(kw_only=True)
class MuonConfig:
    """Muon (optim.muon) on the `targets` matrices, AdamW (optimizer.lr, betas, eps) on the rest; both decay
    by optimizer.weight_decay. Also the settings of `deepspeed_muon`, DeepSpeed's own Muon."""

    lr: float | None = None
    """Peak learning rate of the Muon matrices; None: optimizer.lr, which carries over from AdamW with
    adjust_lr_fn="match_rms_adamw" (with "original", Keller Jordan's rate is 0.02)."""
    momentum: float = MUON_DEFAULTS["momentum"]
    nesterov: bool = MUON_DEFAULTS["nesterov"]
    ns_steps: int = MUON_DEFAULTS["ns_steps"]
    """Newton–Schulz iterations (quintic, torch.optim.Muon's coefficients)."""
    adjust_lr_fn: str = "match_rms_adamw"
    """Update scale: "match_rms_adamw" (0.2·√max(rows, cols): RMS of AdamW's update, Moonshot) or
    "original" (max(1, rows/cols)^½, Keller Jordan)."""
    targets: str = LLAMA_TARGETS
    """Regular expression on parameter names selecting the hidden 2-D matrices Muon updates."""

    def __post_init__(self):
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number or null (= optimizer.lr), got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 1 <= self.ns_steps < 100:
            raise ValueError(f"ns_steps must be in [1, 100), got {self.ns_steps}")
        if self.adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {self.adjust_lr_fn!r}")


@dataclass(kw_only=True)
class ApolloConfig:
    """APOLLO / APOLLO-Mini (optim.apollo) on the `targets` matrices, AdamW on the rest (optimizer.lr, betas, eps,
    weight_decay for both). rank and scale left unset take the entry's recipe: apollo rank 256, scale 1,
    channel-wise factors; apollo_mini rank 1, scale 128, one tensor-wise factor."""

    rank: int | None = None
    update_gap: int = APOLLO_DEFAULTS["update_gap"]
    """Steps between renewals of the random projection (a new seed; the basis is never stored)."""
    scale: float | None = None
    """α: the update is multiplied by √α."""
    targets: str = LLAMA_TARGETS
    """Regular expression on parameter names selecting the projected 2-D weights."""
    eight_bit: bool = False
    """Hold the moments blockwise 8-bit (the projected ones and, from MIN_8BIT_NUMEL values, AdamW's)."""

    def __post_init__(self):
        check_apollo_options(**self.group_options(mini=False))
        check_apollo_options(**self.group_options(mini=True))

    def group_options(self, mini: bool) -> dict:
        """The options of the projected param group: the recipe of apollo or apollo_mini, overridden where set."""
        recipe = APOLLO_MINI_DEFAULTS if mini else APOLLO_DEFAULTS
        set_ = {k: v for k, v in dict(rank=self.rank, scale=self.scale).items() if v is not None}
        return {**recipe, **set_, "update_gap": self.update_gap}


@dataclass(kw_only=True)
class OptimizerConfig:
    name: str = "adamw"
    """Registry key: one of OPTIMIZERS."""
    lr: float = 3e-3
    """Peak learning rate (the schedule multiplies it)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices only, not to norm gains (`optim.adamw.decays`), by
    every optimizer."""
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    sophia: SophiaConfig = field(default_factory=SophiaConfig)
    adahessian: AdaHessianConfig = field(default_factory=AdaHessianConfig)
    mfac: MFACConfig = field(default_factory=MFACConfig)
    muon: MuonConfig = field(default_factory=MuonConfig)
    apollo: ApolloConfig = field(default_factory=ApolloConfig)
    per_layer: bool = False
    """Step each parameter inside backward and free its gradient at once (GaLore's per-layer updates):
    whole-model gradients never coexist. Excludes global-norm clipping."""

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"name must be one of {sorted(OPTIMIZERS)}, got {self.name!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        check_betas(self.betas)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {self.weight_decay}")
        if self.name == "mfac":  # the rule that ties the section to the optimizer's weight decay
            check_mfac_options(**vars(self.mfac), weight_decay=self.weight_decay)
        if self.name == "deepspeed_muon":
            check_deepspeed_muon(self.muon)

    @property
    def needs(self) -> Needs:
        """What this optimizer needs of the training loop (its registry entry)."""
        return OPTIMIZERS[self.name].needs(self)

    @property
    def deepspeed_section(self) -> dict | None:
        """The "optimizer" section of the DeepSpeed config when DeepSpeed builds the optimizer itself
        (its registry entry has `deepspeed`), else None: ours is handed to DeepSpeed as a client optimizer."""
        section = OPTIMIZERS[self.name].deepspeed
        return None if section is None else section(self)


def build_adamw(cfg: OptimizerConfig, named_params: NamedParams) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019): the baseline; `optim.adamw.AdamW`, the update of GradNormLoRP's
    plain groups too (float32 state, stochastic rounding into bf16 weights)."""
    return AdamW(decay_groups((p for _, p in named_params), cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_sgd(cfg: OptimizerConfig, named_params: NamedParams) -> torch.optim.Optimizer:
    """Plain SGD (no momentum), weight decay on matrices: the local optimizer of the federated papers."""
    return torch.optim.SGD(decay_groups((p for _, p in named_params), cfg.weight_decay), lr=cfg.lr)


def build_gradnorm_lorp(cfg: OptimizerConfig, named_params: NamedParams) -> torch.optim.Optimizer:
    """GradNormLoRP on the `lowrank.targets` matrices, AdamW on the rest (optim.gradnorm_lorp)."""
    lr = cfg.lowrank
    groups = lowrank_param_groups(
        ((n, p) for n, p in named_params if p.requires_grad), targets=lr.targets, **lr.group_options(),
        weight_decay=cfg.weight_decay,
    )
    return GradNormLoRP(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, eight_bit=lr.eight_bit)


def build_apollo(cfg: OptimizerConfig, named_params: NamedParams, mini: bool) -> torch.optim.Optimizer:
    """APOLLO(-Mini) on the `apollo.targets` matrices, AdamW on the rest (optim.apollo)."""
    c = cfg.apollo
    groups = apollo_param_groups(((n, p) for n, p in named_params if p.requires_grad), targets=c.targets,
                                 weight_decay=cfg.weight_decay, **c.group_options(mini))
    return Apollo(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, eight_bit=c.eight_bit)


def build_galore_adamw(cfg: OptimizerConfig, named_params: NamedParams) -> torch.optim.Optimizer:
    """galore-torch's GaLoreAdamW (Zhao et al., ICML 2024) on the same targets and rank: the published
    baseline, for comparisons. Its state holds Python projector objects, so its checkpoints save but
    can be neither resumed nor exported (weights-only loading refuses them)."""
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
        if is_lowrank(group):  # galore-torch's names for the same options
            group.update(update_proj_gap=group["update_gap"], proj_type="std")
    return GaLoreAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_sophia(cfg: OptimizerConfig, named_params: NamedParams) -> torch.optim.Optimizer:
    """Sophia (optim.sophia) with decoupled decay on matrices only."""
    c = cfg.sophia
    return Sophia(decay_groups((p for _, p in named_params), cfg.weight_decay), lr=cfg.lr, betas=c.betas, rho=c.rho, eps=c.eps)


def build_adahessian(cfg: OptimizerConfig, named_params: NamedParams) -> torch.optim.Optimizer:
    """AdaHessian (optim.adahessian) with decay on matrices only."""
    c = cfg.adahessian
    return AdaHessian(decay_groups((p for _, p in named_params), cfg.weight_decay), lr=cfg.lr, betas=c.betas, eps=c.eps,
                      hessian_power=c.hessian_power, block_size=c.block_size)


def build_mfac(cfg: OptimizerConfig, named_params: NamedParams) -> torch.optim.Optimizer:
    """Blockwise M-FAC (optim.mfac) with L2 decay on matrices only."""
    c = cfg.mfac
    return MFAC(decay_groups((p for _, p in named_params), cfg.weight_decay), lr=cfg.lr, window=c.window, damping=c.damping,
                momentum=c.momentum, block_size=c.block_size)


def build_muon(cfg: OptimizerConfig, named_params: NamedParams) -> torch.optim.Optimizer:
    """Muon on the `muon.targets` matrices, AdamW on the rest (optim.muon)."""
    c = cfg.muon
    groups = muon_param_groups(named_params, targets=c.targets, weight_decay=cfg.weight_decay, lr=c.lr or cfg.lr,
                               momentum=c.momentum, nesterov=c.nesterov, ns_steps=c.ns_steps, adjust_lr_fn=c.adjust_lr_fn)
    return Muon(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def check_deepspeed_muon(c: MuonConfig) -> None:
    """What DeepSpeed's Muon cannot do of optimizer.muon: it always takes 5 Nesterov Newton–Schulz steps,
    scales the original way and picks its matrices by name (2-D, not "embed"/"lm_head")."""
    fixed = dict(nesterov=True, ns_steps=5, adjust_lr_fn="original", targets=LLAMA_TARGETS)
    for key, value in fixed.items():
        if getattr(c, key) != value:
            raise ValueError(f"optimizer.name=deepspeed_muon needs muon.{key}={value} (DeepSpeed's Muon has no other), "
                             f"got {getattr(c, key)!r}")


def deepspeed_muon_section(cfg: OptimizerConfig) -> dict:
    """DeepSpeed's own Muon (`MuonWithAuxAdam`; ZeRO 1-2 orthogonalize the gathered matrices): Muon at
    muon.lr (optimizer.lr when unset) with momentum, torch's AdamW at optimizer.lr on the rest;
    the standard quintic Newton–Schulz, the iteration torch.optim.Muon runs."""
    return {"type": "Muon", "params": {
        "lr": cfg.lr, "muon_lr": cfg.muon.lr or cfg.lr, "adam_lr": cfg.lr, "momentum": cfg.muon.momentum,
        "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay, "ns_method": "standard",
        "torch_adam": True,  # torch.optim.AdamW for the rest: no fused_adam build
    }}


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """A curvature estimate the loop runs for the optimizer, then hands over with `update_hessian(estimates)`."""

    estimator: str
    """"gnb" (optim.curvature.gnb_diag, on the model's logits) or "hutchinson" (hutchinson_diag, on the loss)."""
    every: int
    """Due at steps 0, k, 2k, ... (before the step's training micro-batches)."""
    micro_batches: int
    """Of the step's micro-batches per worker; 0 = all."""
    method: str
    """HVP method of "hutchinson": "autograd" or "finite_difference"."""

    def due(self, step: int) -> bool:
        return step % self.every == 0


@dataclass(frozen=True, kw_only=True)
class Needs:
    """What an optimizer needs of the training loop and of the distributor, declared once per entry: the loop
    and `distributed.distributor` ask these, never the optimizer object."""

    whole_blocks: bool = False
    """Its update needs each parameter whole (2-D projections, per-block curvature state): under data
    parallelism it runs on owners (distributed.distributor.OwnerDistributor), never on ZeRO's flat partitions."""
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    """DeepSpeed ZeRO stages it runs under."""
    per_layer: bool = True
    """Whether it can be stepped parameter by parameter inside backward (optimizer.per_layer): by its
    `step_param(p, group)` (a `ParamwiseOptimizer`), else by a step narrowed to the one parameter."""
    estimate: Estimate | None = None
    """A curvature estimate every k steps, handed over by `update_hessian(estimates)`; or None."""
    closure: bool = False
    """Its step re-evaluates the loss and gradients of the step's batch through a closure, as M-FAC's
    `step(closure, start=(f(x), ‖∇f(x)‖²))` does: the closure returns (f, ‖∇f‖²) over all shards."""
    metrics: bool = False
    """It reports statistics of its own: `metrics()` → {name: (numerator, denominator)} of sums over its
    parameters, which add up across shards (Sophia's win rate, GNS's γ)."""
    state_cost: bool = False
    """Its `state_numel(p, group)` gives the elements of state it keeps for p (block ownership balances
    by it); otherwise ownership balances by parameter size."""
    int8_targets: str | None = None
    """The regex of the matrices its update writes whole through `rounding.write_weight_`, which may be INT8
    weights (model.weights=int8 quantizes exactly these); None: it cannot train INT8 weights."""


def _estimate(c: EstimateConfig, estimator: str) -> Estimate:
    return Estimate(estimator=estimator, every=c.every, micro_batches=c.micro_batches, method=c.method)


OWNER_SHARDED = dict(whole_blocks=True, zero_stages=(0,))


@dataclass(frozen=True)
class Entry:
    build: Callable[[OptimizerConfig, NamedParams], torch.optim.Optimizer | None]
    needs: Callable[[OptimizerConfig], Needs]
    deepspeed: Callable[[OptimizerConfig], dict] | None = None
    """DeepSpeed builds this optimizer from the config section it returns (`build` gives None)."""


OPTIMIZERS: dict[str, Entry] = {
    "adamw": Entry(build_adamw, lambda cfg: Needs(state_cost=True)),
    "sgd": Entry(build_sgd, lambda cfg: Needs()),
    "gradnorm_lorp": Entry(build_gradnorm_lorp, lambda cfg: Needs(**OWNER_SHARDED, state_cost=True, int8_targets=cfg.lowrank.targets)),
    "apollo": Entry(lambda cfg, named_params: build_apollo(cfg, named_params, mini=False),
                    lambda cfg: Needs(**OWNER_SHARDED, state_cost=True, int8_targets=cfg.apollo.targets)),
    "apollo_mini": Entry(lambda cfg, named_params: build_apollo(cfg, named_params, mini=True),
                         lambda cfg: Needs(**OWNER_SHARDED, state_cost=True, int8_targets=cfg.apollo.targets)),
    "galore_adamw": Entry(build_galore_adamw, lambda cfg: Needs(**OWNER_SHARDED)),
    "sophia": Entry(build_sophia, lambda cfg: Needs(
        **OWNER_SHARDED, per_layer=False, estimate=_estimate(cfg.sophia, cfg.sophia.estimator), metrics=True, state_cost=True)),
    "adahessian": Entry(build_adahessian, lambda cfg: Needs(
        **OWNER_SHARDED, per_layer=False, estimate=_estimate(cfg.adahessian, "hutchinson"), state_cost=True)),
    "mfac": Entry(build_mfac, lambda cfg: Needs(
        **OWNER_SHARDED, per_layer=False, closure=cfg.mfac.damping == "gns", metrics=cfg.mfac.damping == "gns", state_cost=True)),
    "muon": Entry(build_muon, lambda cfg: Needs(**OWNER_SHARDED, state_cost=True)),
    "deepspeed_muon": Entry(lambda cfg, named_params: None, lambda cfg: Needs(zero_stages=(1, 2), per_layer=False),
                            deepspeed=deepspeed_muon_section),
}


def build_optimizer(cfg: OptimizerConfig, named_params: NamedParams) -> torch.optim.Optimizer | None:
    """The optimizer of `cfg` over `named_params`; None where DeepSpeed builds it (`cfg.deepspeed_section`)."""
    return OPTIMIZERS[cfg.name].build(cfg, named_params)
