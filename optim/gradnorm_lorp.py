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

Groups without `rank` get plain AdamW. With eight_bit, the low-rank moments and the plain groups'
moments of tensors with at least MIN_8BIT_NUMEL elements (embeddings, output head) are held blockwise
8-bit, as bitsandbytes' 8-bit Adam does. State holds tensors only; g, s and the
low-rank moments are float32 (float64 for float64 weights) whatever the weight's dtype; the basis is
stored in the weight's dtype when that is bf16/fp16 (as GaLore does) and used in float32.
"""

import re
from collections.abc import Callable, Iterable, Iterator
from itertools import chain

import torch
from torch import Tensor
from torch.nn import Parameter

from .projector import METHODS, choose_side, lowrank_shapes, project, project_back, refresh_basis
from .quantize import BLOCK_SIZE, CHUNK, dequantize_blockwise, quantize_blockwise, zeros_blockwise

# Targets of the LLaMA trainer: the attention and MLP projection matrices (GaLore's choice).
LLAMA_TARGETS = r"(self_attn|mlp)\.\w+_proj\.weight$"

# Options of a low-rank group besides `rank` (GaLore's C4 defaults).
LOWRANK_DEFAULTS = dict(update_gap=200, scale=0.25, proj_side="auto", power_iters=1, proj_method="range_finder")

# Plain-group (AdamW) tensors smaller than this keep full-precision moments under eight_bit
# (bitsandbytes' min_8bit_size): norm gains are small and sensitive. Low-rank moments are always 8-bit.
MIN_8BIT_NUMEL = 4096

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


def adam_direction(
    exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, betas: tuple[float, float], eps: float, step: int
) -> Tensor:
    """Updates the moments in place and returns N = m̂/(√v̂ + ε) (Kingma & Ba 2015, bias-corrected)."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
    return exp_avg.div(denom).div_(1 - beta1**step)


def _zero_moments(shape: torch.Size, dtype: torch.dtype, device: torch.device, eight_bit: bool) -> dict[str, Tensor]:
    """Adam's (m, v) for a tensor of `shape`: full precision, or blockwise 8-bit codes + absmax scales
    (signed map for m, the finer unsigned map for v ≥ 0)."""
    if not eight_bit:
        zeros = torch.zeros(shape, dtype=dtype, device=device)
        return {"exp_avg": zeros, "exp_avg_sq": zeros.clone()}
    state = {}
    for name, signed in _MOMENTS:
        state[f"{name}_codes"], state[f"{name}_absmax"] = zeros_blockwise(shape, BLOCK_SIZE, signed=signed, device=device)
    return state


_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (moment, signed map)


def _moments_directions(state: dict, grad: Tensor, group: dict, step: int) -> Iterator[tuple[slice, Tensor]]:
    """(slice, N) pieces of N = m̂/(√v̂ + ε) of `grad`, over its flattened (row-major) values: all of it at once with
    full-precision moments; with 8-bit moments `CHUNK` values at a time, each chunk of m and v dequantized (in
    float32, or float64 for float64 grads), updated and requantized into its slice of the codes and scales, so
    the temporaries are one chunk's, not the tensor's (the 7b embedding and head: 131M values each)."""
    if "exp_avg" in state:
        yield slice(None), adam_direction(state["exp_avg"], state["exp_avg_sq"], grad, group["betas"], group["eps"], step)
        return
    flat, dtype = grad.reshape(-1), _compute_dtype(grad)
    codes = {k: state[f"{k}_codes"].view(-1) for k, _ in _MOMENTS}
    for start in range(0, flat.numel(), CHUNK):
        values, blocks = slice(start, start + CHUNK), slice(start // BLOCK_SIZE, (start + CHUNK) // BLOCK_SIZE)
        g = flat[values].to(dtype)
        m, v = (dequantize_blockwise(codes[k][values], state[f"{k}_absmax"][blocks], g.shape, BLOCK_SIZE, dtype, signed=sg)
                for k, sg in _MOMENTS)
        direction = adam_direction(m, v, g, group["betas"], group["eps"], step)
        for (k, sg), moment in zip(_MOMENTS, (m, v)):
            chunk_codes, chunk_absmax = quantize_blockwise(moment, BLOCK_SIZE, signed=sg)
            codes[k][values] = chunk_codes
            state[f"{k}_absmax"][blocks] = chunk_absmax
        yield values, direction


def _storage_dtype(p: Tensor) -> torch.dtype:
    return p.dtype if p.dtype in (torch.bfloat16, torch.float16) else _compute_dtype(p)


def _row_norms(x: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1, dtype=dtype)


def _compute_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _check_lowrank_group(group: dict) -> None:
    rank = group["rank"]
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not isinstance(group["update_gap"], int) or group["update_gap"] <= 0:
        raise ValueError(f"update_gap must be a positive int, got {group['update_gap']!r}")
    if not group["scale"] > 0:
        raise ValueError(f"scale must be > 0, got {group['scale']!r}")
    if not isinstance(group["power_iters"], int) or group["power_iters"] < 0:
        raise ValueError(f"power_iters must be a non-negative int, got {group['power_iters']!r}")
    if group["proj_method"] not in METHODS:
        raise ValueError(f"proj_method must be one of {METHODS}, got {group['proj_method']!r}")
    for p in group["params"]:
        if p.dim() != 2:
            raise ValueError(f"a group with rank needs 2-D parameters, got one of shape {tuple(p.shape)}")
        choose_side(p.shape, group["proj_side"])  # raises on a bad proj_side
        if rank >= min(p.shape):
            raise ValueError(
                f"rank {rank} must be < min(m, n) = {min(p.shape)} for parameter of shape {tuple(p.shape)}"
            )


class GradNormLoRP(torch.optim.Optimizer):
    """GradNormLoRP (module docstring); groups with `rank` are projected, the others get AdamW.

    A low-rank group may set `update_gap`, `scale`, `proj_side` ("auto", "left", "right"),
    `power_iters` and `proj_method` ("range_finder", "svd"); see LOWRANK_DEFAULTS. With eight_bit the
    low-rank moments and plain-group moments of tensors of ≥ MIN_8BIT_NUMEL elements are held blockwise
    8-bit (signed map for m, unsigned for v); g's moments and small tensors' stay full precision. `step_param` steps one parameter (per-layer updates, `per_layer`).
    """

    def __init__(
        self,
        params: Iterable[Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        eight_bit: bool = False,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, eight_bit=eight_bit))

    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group:
            param_group = {**LOWRANK_DEFAULTS, **param_group}
        super().add_param_group(param_group)
        if "rank" in param_group:
            _check_lowrank_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group)
        return loss

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict) -> None:
        """Updates one parameter of `group` from p.grad."""
        if p.grad.is_sparse:
            raise ValueError("GradNormLoRP does not support sparse gradients")
        state = self.state[p]
        if not state:
            state.update(self._init_state(p, group))
        state["step"] += 1
        if "rank" in group:
            self._lowrank_step(p, group, state)
        else:
            self._adamw_step(p, group, state)

    def state_numel(self, p: Tensor, group: dict) -> int:
        """Elements of state `step_param` creates for p: the cost model of block ownership."""
        if "rank" not in group:
            return 2 * p.numel()
        basis, low = lowrank_shapes(p.shape, group["rank"], choose_side(p.shape, group["proj_side"]))
        return basis.numel() + 2 * low.numel() + 4 * p.shape[0]

    def _init_state(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        state = {"step": torch.tensor(0, dtype=torch.int64)}
        if "rank" not in group:
            return state | _zero_moments(p.shape, p.dtype, p.device, group["eight_bit"] and p.numel() >= MIN_8BIT_NUMEL)
        dtype = _compute_dtype(p)
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
        return state | _zero_moments(low_shape, dtype, p.device, group["eight_bit"])

    def _adamw_step(self, p: Tensor, group: dict, state: dict) -> None:
        step, lr = int(state["step"]), group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        flat = p.view(-1)  # parameters are contiguous
        for values, direction in _moments_directions(state, p.grad, group, step):
            flat[values].add_(direction.reshape(-1), alpha=-lr)

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
        direction = torch.empty(low.shape, dtype=low.dtype, device=low.device)
        for values, piece in _moments_directions(state, low, group, step):
            direction.view(-1)[values] = piece.reshape(-1)
        delta_v = project_back(direction, basis, side)
        del grad_v, low, direction  # free the full-size ∇V before the write-back

        g_old = g.clone()
        g.mul_(1 - lr * group["weight_decay"])
        betas, eps = group["betas"], group["eps"]
        g.add_(adam_direction(state["g_exp_avg"], state["g_exp_avg_sq"], grad_g, betas, eps, step), alpha=-lr)

        v = p if p.dtype == g.dtype else p.to(g.dtype)
        v.mul_((s / g_old)[:, None]).add_(delta_v, alpha=-lr * group["scale"])
        s.copy_(_row_norms(v, s.dtype))
        v.mul_((g / s)[:, None])
        if v is not p:
            p.copy_(v)

    def load_state_dict(self, state_dict: dict) -> None:
        # Optimizer.load_state_dict casts every state tensor to its parameter's dtype; ours keeps
        # float32 statistics for bf16 weights and uint8 codes on purpose, so restore the saved dtypes.
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for i, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                device = value.device if key == "step" else p.device  # the step count stays on the CPU
                self.state[p][key] = value.to(device, copy=True)


def lowrank_param_groups(
    named_params: Iterable[tuple[str, Parameter]],
    *,
    targets: str,
    rank: int,
    update_gap: int,
    scale: float,
    proj_side: str = "auto",
    power_iters: int = 1,
    proj_method: str = "range_finder",
    weight_decay: float = 0.0,
) -> list[dict]:
    """Two param groups, both with `weight_decay`: trainable parameters whose name matches the regex
    `targets` (re.search; must be 2-D) with the low-rank options, and all other trainable parameters
    (plain AdamW). The trainer's rule is LLAMA_TARGETS."""
    lowrank, plain = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if re.search(targets, name):
            if p.dim() != 2:
                raise ValueError(f"low-rank target {name!r} matched by {targets!r} is not 2-D (shape {tuple(p.shape)})")
            lowrank.append(p)
        else:
            plain.append(p)
    if not lowrank:
        raise ValueError(f"the low-rank target rule {targets!r} matches no trainable parameter")
    groups = [
        dict(params=lowrank, rank=rank, update_gap=update_gap, scale=scale, proj_side=proj_side,
             power_iters=power_iters, proj_method=proj_method, weight_decay=weight_decay)
    ]
    return groups + ([dict(params=plain, weight_decay=weight_decay)] if plain else [])
