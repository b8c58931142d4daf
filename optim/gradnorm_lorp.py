"""GradNormLoRP: gradient weight-normalized low-rank projection (Huang et al., AAAI 2025, "Gradient
Weight-normalized Low-rank Projection for Efficient LLM Training").

Each projected weight W (m×n) is reparameterized row by row with weight normalization (Salimans &
Kingma 2016), wᵢ = gᵢ · vᵢ/‖vᵢ‖, without storing V: the state keeps the magnitudes g (m) and the
direction norms s = ‖vᵢ‖ (m), and V = (s/g) ⊙ W row-wise, since vᵢ/‖vᵢ‖ = wᵢ/gᵢ. At the first step
g = s = ‖wᵢ‖ (so V = W). From ∇W, with uᵢ = wᵢ/gᵢ:

    ∇gᵢ = ∇wᵢ · uᵢ,      ∇vᵢ = (gᵢ/sᵢ) (∇wᵢ − ∇gᵢ uᵢ)

(the official code drops the term −∇gᵢ uᵢ; it is kept here). The direction gradient goes through
GaLore's low-rank Adam (`projector`): every `update_gap` steps the basis is refreshed from ∇V,
R = project(∇V), Adam moments of R in the r-dim space (optionally blockwise 8-bit, `quantize`),
N = m̂/(√v̂ + ε), ΔV = −lr · scale · project_back(N). As in GaLore, the moments are kept when the basis
is refreshed. The magnitude g gets its own full-precision Adam step with lr. Weight decay is
decoupled and applied to g only: g ← (1 − lr·wd) g, which scales every row of W by (1 − lr·wd)
exactly as AdamW's decay of W; the direction V is scale-free and not decayed. Then, in place on W:

    W ← (s/g_old) ⊙ W + ΔV     (W holds V′),    s ← ‖rows of W‖,    W ← (g_new/s) ⊙ W

Groups without `rank` get plain AdamW (the base class, `adamw.AdamW`). With eight_bit, the low-rank
moments and the plain groups' moments of tensors with at least adamw.MIN_8BIT_NUMEL elements
(embeddings, output head) are held blockwise 8-bit, as bitsandbytes' 8-bit Adam does. State holds
tensors only; g, s and all moments are float32 (float64 for float64 weights) whatever the weight's
dtype, 8-bit codes dequantize into float32; the basis is stored in the weight's dtype when that is
bf16/fp16 (as GaLore does) and used in float32. The update is computed in float32 and written into
bf16 weights with stochastic rounding (`rounding.write_weight_`): no fp32 master copy, and small
updates do not vanish.
"""

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.nn import Parameter

from .adamw import AdamW, adam_direction, moments_direction, target_groups, zero_moments
from .projector import METHODS, SIDES, choose_side, lowrank_shapes, project, project_back, refresh_basis
from .rounding import write_weight_
from .state import state_dtype

# Targets of the LLaMA trainer: the attention and MLP projection matrices (GaLore's choice).
LLAMA_TARGETS = r"(self_attn|mlp)\.\w+_proj\.weight$"

# Options of a low-rank group besides `rank` (GaLore's C4 defaults).
LOWRANK_DEFAULTS = dict(update_gap=200, scale=0.25, proj_side="auto", power_iters=1, proj_method="range_finder")

# The first basis of every weight is drawn from a generator with this seed, so data-parallel replicas
# agree on it and runs repeat; later refreshes warm-start from the stored basis and draw nothing.
SKETCH_SEED = 0


def weight_norm_grads(weight: Tensor, grad: Tensor, g: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(∇g, ∇V) of wᵢ = gᵢ vᵢ/sᵢ given ∇W (Salimans & Kingma 2016), in the dtype of g:

    ∇gᵢ = ∇wᵢ·wᵢ/gᵢ,    ∇vᵢ = (gᵢ/sᵢ)(∇wᵢ − ∇gᵢ wᵢ/gᵢ) = (gᵢ/sᵢ)∇wᵢ − (∇gᵢ/sᵢ)wᵢ
    """
    w, dw = weight.to(g.dtype), grad.to(g.dtype)
    grad_g = torch.linalg.vecdot(dw, w) / g
    grad_v = dw * (g / s)[:, None]
    return grad_g, grad_v.addcmul_(w, (-grad_g / s)[:, None])


def _storage_dtype(p: Tensor) -> torch.dtype:
    return p.dtype if p.dtype in (torch.bfloat16, torch.float16) else state_dtype(p)


def _row_norms(x: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1, dtype=dtype)


def is_lowrank(group: dict) -> bool:
    """Whether a param group is projected (GaLore's convention: it sets `rank`)."""
    return "rank" in group


def check_lowrank_options(*, rank, update_gap, scale, proj_side, power_iters, proj_method, **_) -> None:
    """The one check of a low-rank group's options (LOWRANK_DEFAULTS names them); shapes are checked per
    parameter by `_check_lowrank_group`."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not isinstance(update_gap, int) or update_gap <= 0:
        raise ValueError(f"update_gap must be a positive int, got {update_gap!r}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    if proj_side not in ("auto", *SIDES):
        raise ValueError(f"proj_side must be 'auto', 'left' or 'right', got {proj_side!r}")
    if not isinstance(power_iters, int) or power_iters < 0:
        raise ValueError(f"power_iters must be a non-negative int, got {power_iters!r}")
    if proj_method not in METHODS:
        raise ValueError(f"proj_method must be one of {METHODS}, got {proj_method!r}")


def _check_lowrank_group(group: dict) -> None:
    check_lowrank_options(**group)
    for p in group["params"]:
        if p.dim() != 2:
            raise ValueError(f"a group with rank needs 2-D parameters, got one of shape {tuple(p.shape)}")
        if group["rank"] >= min(p.shape):
            raise ValueError(
                f"rank {group['rank']} must be < min(m, n) = {min(p.shape)} for parameter of shape {tuple(p.shape)}"
            )


class GradNormLoRP(AdamW):
    """GradNormLoRP (module docstring); groups with `rank` are projected, the others get `AdamW`.

    A low-rank group may set `update_gap`, `scale`, `proj_side` ("auto", "left", "right"),
    `power_iters` and `proj_method` ("range_finder", "svd"); see LOWRANK_DEFAULTS. With eight_bit the
    low-rank moments and plain-group moments of tensors of ≥ MIN_8BIT_NUMEL elements are held blockwise
    8-bit (signed map for m, unsigned for v); g's moments and small tensors' stay full precision.
    `step_param` steps one parameter (per-layer updates, `per_layer`).
    """

    def add_param_group(self, param_group: dict) -> None:
        if is_lowrank(param_group):
            param_group = {**LOWRANK_DEFAULTS, **param_group}
        super().add_param_group(param_group)
        if is_lowrank(param_group):
            _check_lowrank_group(self.param_groups[-1])

    def state_numel(self, p: Tensor, group: dict) -> int:
        """Elements of state `step_param` creates for p: the cost model of block ownership."""
        if not is_lowrank(group):
            return super().state_numel(p, group)
        basis, low = lowrank_shapes(p.shape, group["rank"], choose_side(p.shape, group["proj_side"]))
        return basis.numel() + 2 * low.numel() + 4 * p.shape[0]

    def _init_state(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        if not is_lowrank(group):
            return super()._init_state(p, group)
        state = {"step": torch.tensor(0, dtype=torch.int64)}
        dtype = state_dtype(p)
        norms = _row_norms(p, dtype)
        if (norms == 0).any():
            raise ValueError(
                f"weight normalization needs non-zero rows; a parameter of shape {tuple(p.shape)} has a zero row"
            )
        side = choose_side(p.shape, group["proj_side"])
        basis_shape, low_shape = lowrank_shapes(p.shape, group["rank"], side)
        state |= {
            "g": norms,
            "s": norms.clone(),
            "g_exp_avg": torch.zeros_like(norms),
            "g_exp_avg_sq": torch.zeros_like(norms),
            # stored in the weight's dtype when that is narrower (bf16), as GaLore does; used in `dtype`
            "basis": torch.zeros(basis_shape, dtype=_storage_dtype(p), device=p.device),
        }
        return state | zero_moments(low_shape, dtype, p.device, group["eight_bit"])

    def _update(self, p: Tensor, group: dict, state: dict) -> None:
        if is_lowrank(group):
            self._lowrank_step(p, group, state)
        else:
            super()._update(p, group, state)

    def _lowrank_step(self, p: Tensor, group: dict, state: dict) -> None:
        step, lr, g, s = int(state["step"]), group["lr"], state["g"], state["s"]
        side = choose_side(p.shape, group["proj_side"])
        grad_g, grad_v = weight_norm_grads(p, p.grad, g, s)
        if (step - 1) % group["update_gap"] == 0:
            cold = step == 1  # before it, state["basis"] holds zeros
            basis = refresh_basis(
                grad_v,
                group["rank"],
                side,
                prev=None if cold else state["basis"].to(grad_v.dtype),
                power_iters=group["power_iters"],
                method=group["proj_method"],
                generator=torch.Generator(p.device).manual_seed(SKETCH_SEED) if cold else None,
            )
            state["basis"] = basis.to(state["basis"].dtype)
        basis = state["basis"].to(grad_v.dtype)
        low = project(grad_v, basis, side)
        direction = moments_direction(state, low, group, step)
        delta_v = project_back(direction, basis, side)
        del grad_v, low, direction  # free the full-size ∇V before the write-back

        g_old = g.clone()
        g.mul_(1 - lr * group["weight_decay"])
        betas, eps = group["betas"], group["eps"]
        g.add_(adam_direction(state["g_exp_avg"], state["g_exp_avg_sq"], grad_g, betas, eps, step), alpha=-lr)

        v = p.to(g.dtype, copy=hasattr(p, "write_"))  # p itself, or a copy (bf16 weights; INT8 ones, dequantized)
        v.mul_((s / g_old)[:, None]).add_(delta_v, alpha=-lr * group["scale"])
        s.copy_(_row_norms(v, s.dtype))
        v.mul_((g / s)[:, None])
        write_weight_(p, v)  # stochastic rounding into bf16 weights


def lowrank_param_groups(
    named_params: Iterable[tuple[str, Parameter]],
    *,
    targets: str,
    rank: int,
    weight_decay: float = 0.0,
    **options,
) -> list[dict]:
    """Param groups: trainable parameters whose name matches the regex `targets` (re.search; must be
    2-D) with `rank`, the low-rank `options` (LOWRANK_DEFAULTS where not given) and `weight_decay`, then all
    other trainable parameters (plain AdamW) split by the weight decay rule of every optimizer here
    (`adamw.target_groups`). The trainer's rule is LLAMA_TARGETS."""
    return target_groups(named_params, targets, "low-rank", weight_decay, rank=rank, **{**LOWRANK_DEFAULTS, **options})
