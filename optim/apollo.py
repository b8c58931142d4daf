"""APOLLO and APOLLO-Mini (Zhu et al., MLSys 2025, "APOLLO: SGD-like Memory, AdamW-level Performance",
arXiv 2412.05270): AdamW's per-element learning rates approximated by scaling factors estimated in a
random low-rank space, so the optimizer state of a weight is that of a rank-r projection of its gradient.

For a projected weight W (m×n) with gradient G at step t:

    P: Gaussian basis, entries N(0, 1/r), drawn from a seed renewed every `update_gap` steps (never stored;
       `projector.random_basis`, on the shorter side as GaLore's rule)
    R = project(G, P)                                  (r×n or m×r)
    m ← β₁m + (1 − β₁)R,  v ← β₂v + (1 − β₂)R²,  Ñ = m̂/(√v̂ + ε)      (moments in the r-dim space)
    channel (APOLLO):      s_j = ‖Ñ_{:,j}‖ / (‖R_{:,j}‖ + 1e-8), one per channel of the kept dimension
    tensor  (APOLLO-Mini): s = ‖Ñ‖ / (‖R‖ + 1e-8), one number
    G̃ = G · s
    norm-growth limiter (Fira; in the official code): if ‖G̃‖ > γ·‖G̃_{t−1}‖ then G̃ ← G̃ · γ‖G̃_{t−1}‖/‖G̃‖, γ = 1.01
    W ← (1 − lr·wd) W − lr·√α·G̃                       (α = `scale`: 1 for APOLLO, 128 for APOLLO-Mini)

The moments are kept when the projection is renewed (as GaLore and the official code). Decay is
decoupled, on the old W, as every optimizer here (the official code decays the updated W: a second-order
difference in lr). Groups without `rank` get plain AdamW (the base class). State of a projected weight: the
two rank-r moments (8-bit with eight_bit, as GradNormLoRP's), the previous ‖G̃‖, and the seed.

Randomness: the basis of the k-th renewal of the i-th parameter (its position in the param groups) comes
from seed `seed_of(i, k)`, and the stochastic rounding of the written weight from `seed_of(i, t)` on
another stream (`write_weight_` with a generator: INT8 weights, `models.int8`). So runs repeat, a resumed
run continues exactly, and every rank of a data-parallel run draws the same bits.
"""

import torch
from torch import Tensor

from .adamw import AdamW, moments_direction, target_groups, zero_moments
from .projector import channel_norms, choose_side, lowrank_shapes, project, random_basis, scale_channels
from .rounding import write_weight_
from .state import state_dtype

SCALE_TYPES = ("channel", "tensor")
APOLLO_DEFAULTS = dict(rank=256, update_gap=200, scale=1.0, scale_type="channel")
"""The official APOLLO recipe (LLaMA pretraining)."""
APOLLO_MINI_DEFAULTS = dict(rank=1, update_gap=200, scale=128.0, scale_type="tensor")
"""The official APOLLO-Mini recipe: rank 1, one tensor-wise factor, √128 on the update."""
NORM_GROWTH = 1.01
"""γ of the norm-growth limiter."""
_STREAMS = {"basis": 0, "rounding": 1}


def seed_of(index: int, counter: int, stream: str) -> int:
    """The seed of the `counter`-th draw of `stream` ("basis" renewals or "rounding" steps) of parameter `index`:
    the splitmix64 finalizer of the three, so that its low 32 bits (all that the CPU generator's Mersenne
    twister takes) differ too."""
    z = ((index << 33) ^ (counter << 1) ^ _STREAMS[stream]) + 0x9E3779B97F4A7C15
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (z ^ (z >> 31)) >> 1


def check_apollo_options(*, rank, update_gap, scale, scale_type, **_) -> None:
    """The one check of a projected group's options."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not isinstance(update_gap, int) or update_gap < 1:
        raise ValueError(f"update_gap must be a positive int, got {update_gap!r}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    if scale_type not in SCALE_TYPES:
        raise ValueError(f"scale_type must be one of {SCALE_TYPES}, got {scale_type!r}")


class Apollo(AdamW):
    """APOLLO / APOLLO-Mini (module docstring) on the groups with `rank` (and `update_gap`, `scale`,
    `scale_type`: APOLLO_DEFAULTS where not given); AdamW on the others."""

    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group:
            param_group = {**APOLLO_DEFAULTS, **param_group}
            check_apollo_options(**param_group)
            for p in param_group["params"]:
                if p.dim() != 2 or param_group["rank"] > min(p.shape):
                    raise ValueError(f"APOLLO needs 2-D parameters with rank ≤ min(m, n); got shape {tuple(p.shape)} "
                                     f"at rank {param_group['rank']}")
        super().add_param_group(param_group)

    def state_numel(self, p: Tensor, group: dict) -> int:
        if "rank" not in group:
            return super().state_numel(p, group)
        _, low = lowrank_shapes(p.shape, group["rank"], choose_side(p.shape))
        return 2 * low.numel() + 2

    def _index(self, p: Tensor) -> int:
        return next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is p)

    def _init_state(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        if "rank" not in group:
            return super()._init_state(p, group)
        _, low = lowrank_shapes(p.shape, group["rank"], choose_side(p.shape))
        dtype = state_dtype(p)
        return {"step": torch.tensor(0, dtype=torch.int64), "index": torch.tensor(self._index(p), dtype=torch.int64),
                "update_norm": torch.zeros((), dtype=dtype, device=p.device)} | zero_moments(low, dtype, p.device, group["eight_bit"])

    def _update(self, p: Tensor, group: dict, state: dict) -> None:
        if "rank" not in group:
            super()._update(p, group, state)
            return
        step, index, lr = int(state["step"]), int(state["index"]), group["lr"]
        side, dtype = choose_side(p.shape), state_dtype(p)
        grad = p.grad.to(dtype)
        basis = random_basis(p.shape, group["rank"], side, seed_of(index, (step - 1) // group["update_gap"], "basis"),
                             device=p.device, dtype=dtype)
        low = project(grad, basis, side)
        direction = moments_direction(state, low, group, step)
        if group["scale_type"] == "channel":
            scale_channels(grad, channel_norms(direction, side) / (channel_norms(low, side) + 1e-8), side)
        else:
            grad.mul_(torch.linalg.vector_norm(direction) / (torch.linalg.vector_norm(low) + 1e-8))
        del basis, low, direction
        norm = torch.linalg.vector_norm(grad)
        if step > 1:  # the limiter, without a host sync: factor min(γ‖G̃_{t−1}‖ / ‖G̃‖, 1)
            factor = (NORM_GROWTH * state["update_norm"] / norm.clamp(min=torch.finfo(dtype).tiny)).clamp_(max=1.0)
            grad.mul_(factor)
            norm = norm * factor
        state["update_norm"].copy_(norm)
        w = p.to(dtype, copy=True)  # float32 values of any weight (bf16, INT8: dequantized)
        w.mul_(1 - lr * group["weight_decay"]).add_(grad, alpha=-lr * group["scale"] ** 0.5)
        del grad
        write_weight_(p, w, torch.Generator(p.device).manual_seed(seed_of(index, step, "rounding")))


def apollo_param_groups(named_params, *, targets: str, weight_decay: float = 0.0, **options) -> list[dict]:
    """Param groups: the trainable 2-D parameters whose name matches `targets` with the APOLLO `options`
    (rank, update_gap, scale, scale_type), the rest split by the weight decay rule (`adamw.target_groups`)."""
    return target_groups(named_params, targets, "APOLLO", weight_decay, **options)
