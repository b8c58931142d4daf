"""AdamW (Loshchilov & Hutter, ICLR 2019, "Decoupled Weight Decay Regularization") as the project uses
it: the AdamW baseline, and the update of GradNormLoRP's non-projected groups (its base class).

For each parameter w with gradient ∇w, at step t (Kingma & Ba 2015, bias-corrected):

    m ← β₁m + (1 − β₁)∇w,   v ← β₂v + (1 − β₂)∇w²,   N = m̂/(√v̂ + ε),   w ← (1 − lr·wd) w − lr·N

Precision: the state (m, v) is float32 (float64 for float64 weights) whatever the weights' dtype, and
the update is computed in float32; bf16 weights (owner-sharded runs keep no fp32 master copy) receive
it with stochastic rounding (`rounding.write_weight_`), so small updates do not vanish. With
eight_bit, the moments of tensors with ≥ MIN_8BIT_NUMEL elements are held blockwise 8-bit
(`quantize`, as bitsandbytes' 8-bit Adam) and dequantized into float32 for the update.

Weight decay rule, the one for every optimizer here: matrices (dim ≥ 2: projections, embeddings,
output head) are decayed, vectors (norm gains, biases) are not (nanoGPT's and GaLore's rule).
"""

import re
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor
from torch.nn import Parameter

from .quantize import BLOCK_SIZE, CHUNK, dequantize_blockwise, quantize_blockwise, zeros_blockwise
from .rounding import write_weight_
from .state import ParamwiseOptimizer, check_betas, state_dtype

# Tensors smaller than this keep full-precision moments under eight_bit (bitsandbytes' min_8bit_size):
# norm gains are small and sensitive.
MIN_8BIT_NUMEL = 4096


def decays(p: Tensor) -> bool:
    """Whether decoupled weight decay acts on p: matrices yes, vectors (norm gains, biases) no."""
    return len(getattr(p, "ds_shape", p.shape)) >= 2  # ZeRO-3 partitions are flat; ds_shape is the real one


def decay_groups(params: Iterable[Parameter], weight_decay: float, **options) -> list[dict]:
    """Param groups of the trainable `params` split by `decays`: the decayed ones with `weight_decay`,
    the others with 0; `options` go into both; an empty group is left out."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if decays(p)], "weight_decay": weight_decay, **options},
        {"params": [p for p in params if not decays(p)], "weight_decay": 0.0, **options},
    ]
    return [g for g in groups if g["params"]]


def target_groups(named_params: Iterable[tuple[str, Parameter]], targets: str, kind: str, weight_decay: float,
                  **options) -> list[dict]:
    """Param groups of an optimizer with its own update for some matrices (GradNormLoRP's projections,
    Muon's orthogonalized momentum) and AdamW for the rest: the trainable parameters whose name matches
    the regex `targets` (re.search; each must be 2-D), with `options` and `weight_decay`, then all other
    trainable parameters split by `decay_groups`. `kind` names the targets in errors."""
    matched, plain = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if re.search(targets, name):
            if p.dim() != 2:
                raise ValueError(f"{kind} target {name!r} matched by {targets!r} is not 2-D (shape {tuple(p.shape)})")
            matched.append(p)
        else:
            plain.append(p)
    if not matched:
        raise ValueError(f"the {kind} target rule {targets!r} matches no trainable parameter")
    return [dict(params=matched, weight_decay=weight_decay, **options)] + decay_groups(plain, weight_decay)


def adam_direction(
    exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, betas: tuple[float, float], eps: float, step: int
) -> Tensor:
    """Updates the moments in place and returns N = m̂/(√v̂ + ε) (Kingma & Ba 2015, bias-corrected)."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
    return exp_avg.div(denom).div_(1 - beta1**step)


_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (moment, signed map)


def zero_moments(shape: torch.Size, dtype: torch.dtype, device: torch.device, eight_bit: bool) -> dict[str, Tensor]:
    """Adam's (m, v) for a tensor of `shape`: `dtype`, or blockwise 8-bit codes + absmax scales
    (signed map for m, the finer unsigned map for v ≥ 0), made without a full-size float temporary."""
    if not eight_bit:
        zeros = torch.zeros(shape, dtype=dtype, device=device)
        return {"exp_avg": zeros, "exp_avg_sq": zeros.clone()}
    state = {}
    for name, signed in _MOMENTS:
        state[f"{name}_codes"], state[f"{name}_absmax"] = zeros_blockwise(shape, BLOCK_SIZE, signed=signed, device=device)
    return state


def moments_directions(state: dict, grad: Tensor, group: dict, step: int) -> Iterator[tuple[slice, Tensor]]:
    """(slice, N) pieces of N = m̂/(√v̂ + ε) of `grad` over its flattened (row-major) values, in the state's
    dtype (float32, or float64 for float64 gradients): all of it at once with full-precision moments; with
    8-bit moments `CHUNK` values at a time, each chunk of m and v dequantized, updated and requantized into
    its slice of the codes and scales, so the temporaries are one chunk's, not the tensor's (the 7b
    embedding and head: 131M values each)."""
    dtype = state_dtype(grad)
    if "exp_avg" in state:
        yield slice(None), adam_direction(state["exp_avg"], state["exp_avg_sq"], grad.to(dtype), group["betas"], group["eps"], step)
        return
    flat = grad.reshape(-1)
    codes = {k: state[f"{k}_codes"].view(-1) for k, _ in _MOMENTS}
    for start in range(0, flat.numel(), CHUNK):
        values, blocks = slice(start, start + CHUNK), slice(start // BLOCK_SIZE, (start + CHUNK) // BLOCK_SIZE)
        g = flat[values].to(dtype)
        m, v = (dequantize_blockwise(codes[k][values], state[f"{k}_absmax"][blocks], g.shape, BLOCK_SIZE, dtype, signed=sg)
                for k, sg in _MOMENTS)
        direction = adam_direction(m, v, g, group["betas"], group["eps"], step)
        for (k, sg), moment in zip(_MOMENTS, (m, v)):
            codes[k][values], state[f"{k}_absmax"][blocks] = quantize_blockwise(moment, BLOCK_SIZE, signed=sg)
        yield values, direction


def moments_direction(state: dict, grad: Tensor, group: dict, step: int) -> Tensor:
    """The whole N of `moments_directions`, shaped like `grad` (for small tensors: the low-rank moments)."""
    direction = torch.empty(grad.shape, dtype=state_dtype(grad), device=grad.device)
    for values, piece in moments_directions(state, grad, group, step):
        direction.view(-1)[values] = piece.reshape(-1)
    return direction


class AdamW(ParamwiseOptimizer):
    """AdamW with float32 state and stochastically rounded writes into bf16 weights (module docstring).

    `step_param(p, group)` steps one parameter (per-layer updates, `per_layer`).
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
        check_betas(betas)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, eight_bit=eight_bit))

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict) -> None:
        """Updates one parameter of `group` from p.grad."""
        if p.grad.is_sparse:
            raise ValueError(f"{type(self).__name__} does not support sparse gradients")
        state = self.state[p]
        if not state:
            state.update(self._init_state(p, group))
        state["step"] += 1
        self._update(p, group, state)

    def state_numel(self, p: Tensor, group: dict) -> int:
        """Elements of state `step_param` creates for p: the cost model of block ownership."""
        return 2 * p.numel()

    def _init_state(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        eight_bit = group["eight_bit"] and p.numel() >= MIN_8BIT_NUMEL
        return {"step": torch.tensor(0, dtype=torch.int64)} | zero_moments(p.shape, state_dtype(p), p.device, eight_bit)

    def _update(self, p: Tensor, group: dict, state: dict) -> None:
        lr, flat = group["lr"], p.view(-1)  # parameters are contiguous
        for values, direction in moments_directions(state, p.grad, group, int(state["step"])):
            piece = flat[values]
            w = piece.to(direction.dtype)  # piece itself for float32/float64 weights
            w.mul_(1 - lr * group["weight_decay"]).add_(direction.reshape(-1), alpha=-lr)
            write_weight_(piece, w)  # stochastic rounding into bf16 weights

