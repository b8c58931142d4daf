"""Writing an fp32 update into low-precision weights without losing small updates.

Round-to-nearest into bf16 (8 mantissa bits) drops every update smaller than half a unit in the
last place of the weight (|Δw| < 2⁻⁹|w|): with lr·update ≈ 1e-3·|w| most steps would vanish. Stochastic
rounding (Gupta et al., ICML 2015; Zamirai et al. 2020 for bf16 training) rounds x up with probability
equal to its distance from the lower neighbour, so E[round(x)] = x and the small updates accumulate
in expectation, with no extra state (no fp32 master copy, no Kahan buffer).

For bf16 — the top 16 bits of an fp32 — this is: add a uniform random integer in [0, 2¹⁶) to the fp32
bit pattern, then truncate the low 16 bits. Other dtypes are copied (rounded to nearest, or exact).
The same rule on an integer grid is `stochastic_round_`: floor(x + u), u ~ U[0, 1), used by the INT8
weight format (`quantize.quantize_int8`). A weight that rounds its own writes (an INT8 weight,
`models.int8`) has `write_`: it gets the float32 value and the generator, not the bf16 rounding.
"""

import torch
from torch import Tensor


def stochastic_round_(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x ← floor(x + u) in place, u ~ U[0, 1) from `generator` (float x): E[result] = x; returns x."""
    return x.add_(torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)).floor_()


def write_weight_(p: Tensor, value: Tensor, generator: torch.Generator | None = None) -> None:
    """p ← value, where `value` holds p's new weights in float32 or wider (consumed: it is overwritten).
    bf16 weights get stochastic rounding (module docstring), a weight with `write_` rounds it itself
    (with `generator`, else the global one); a `value` that is p itself is left alone."""
    if value is p:
        return
    if hasattr(p, "write_"):
        p.write_(value, generator)
        return
    if p.dtype == torch.bfloat16 and value.dtype == torch.float32:
        bits = value.view(torch.int32)
        bits.add_(torch.randint_like(bits, 0, 1 << 16)).bitwise_and_(-(1 << 16))  # low 16 bits cleared
    p.copy_(value)
