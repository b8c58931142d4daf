"""Blockwise 8-bit quantization with the dynamic map (Dettmers et al., ICLR 2022, "8-bit Optimizers via
Block-wise Quantization"), the storage format of 8-bit optimizer moments.

A tensor is flattened and cut into blocks of `block_size` values (the last block may be shorter).
Each block keeps its absmax a_b (float32); each value x keeps the uint8 index of the map entry nearest
to x / a_b:

    codes[i] = argmin_k |map[k] − x_i / a_b(i)|,      deq(codes)[i] = map[codes[i]] · a_b(i)

The map is the 256-entry dynamic type of bitsandbytes' `create_dynamic_map`: a sign bit (signed map
only), a run of zero bits giving a decimal exponent 10^-e (e = 0..6), then linearly spaced fractions
in [0.1, 1]; plus 0 and 1. Values near 0 keep more relative precision than in a linear map.
The unsigned map (for non-negative tensors such as Adam's second moment) spends the sign bit on
twice as many fractions, halving the error.

Error bound (round to nearest, inputs x/a_b in [-1, 1], or [0, 1] for the unsigned map):

    |x − deq(q(x))| ≤ a_b · δ,   δ = max(max_k (map[k+1] − map[k]) / 2, distance from the range's ends to the map)

which `max_error(signed)` returns: δ = 0.5·0.9/64 ≈ 0.0070 signed, 0.5·0.9/128 ≈ 0.0035 unsigned
(set by the widest steps, those of the top decade [0.1, 1]), up to float32 rounding of map·a_b.

Where bitsandbytes imports, its blockwise kernels, which read and write the same format, do the work
on CUDA and on the CPU (the CPU ones ≈ 6× faster quantizing and ≈ 30× dequantizing than the torch path on
the 8M-value embedding of the 20m model). Its CPU quantizer is not exact round-to-nearest: it may pick a
neighbouring code (several codes off only for |x/a_b| < 1e-4, where codes are 1e-5 apart), so on that
path the bound is one step of the map, 2δ (measured: 1.005δ). The torch path (exact nearest code:
`bucketize` on the midpoints of the map) runs on any device without bitsandbytes, and for block sizes
bitsandbytes does not take. Moments are updated `CHUNK` values at a time (`optim.adamw.moments_directions`), so
neither path holds full-size temporaries of a large tensor.

Weights (`quantize_int8`, the format of INT8 weights, `models.int8`) use the same blocks with the linear
symmetric map instead (Q-GaLore's INT8 weights): scale_b = a_b / 127, codes[i] = round(x_i / scale_b(i)) in
int8, deq = codes · scale_b. A block's absmax value is coded ±127 exactly, so a dequantized tensor quantized
again gives back the same codes. Round to nearest errs by ≤ scale_b / 2; with `stochastic=True` the code is
floor(x/scale_b + u), u ~ U[0, 1) (`rounding.stochastic_round_`): E[deq] = x, so updates far below one step
of the grid accumulate in expectation instead of vanishing.
"""

import functools
import math

import torch
from torch import Tensor

from .rounding import stochastic_round_

BLOCK_SIZE = 256
CHUNK = 1 << 20
"""Values of a moment dequantized, updated and requantized at a time (a multiple of BLOCK_SIZE): 4 MiB fp32 temporaries."""
_BNB_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@functools.cache
def _cpu_dynamic_map(signed: bool) -> Tensor:
    # Entry for entry as bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8).
    values = []
    for i in range(7):
        fractions = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, fractions, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (i - 6) * means).tolist()
        if signed:
            values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def dynamic_map(signed: bool = True, device: torch.device | str = "cpu") -> Tensor:
    """The 256 sorted float32 values of the signed or unsigned dynamic map, built once per device."""
    return _cpu_dynamic_map(signed).to(device)


@functools.cache
def _midpoints(signed: bool, device: torch.device) -> Tensor:
    code = dynamic_map(signed, device)
    return (code[:-1] + code[1:]) / 2


@functools.cache
def max_error(signed: bool = True) -> float:
    """δ of the error bound |x − deq(q(x))| ≤ absmax_block · δ (module docstring)."""
    code = _cpu_dynamic_map(signed).double()
    low = -1.0 if signed else 0.0
    return max((code.diff().max() / 2).item(), code[0].item() - low, 1.0 - code[-1].item())


@functools.cache
def _bnb_functional():
    try:
        import bitsandbytes.functional as F
    except ImportError:
        return None
    return F


def _use_bnb(x: Tensor, block_size: int):
    return _bnb_functional() if x.device.type in ("cpu", "cuda") and block_size in _BNB_BLOCK_SIZES else None


def uses_bitsandbytes(device: torch.device | str, block_size: int = BLOCK_SIZE) -> bool:
    """Whether bitsandbytes' kernels quantize on `device` at `block_size` (else the exact torch path)."""
    return _use_bnb(torch.empty(0, device=device), block_size) is not None


def error_bound(signed: bool, device: torch.device | str, block_size: int = BLOCK_SIZE) -> float:
    """δ' of |x − deq(q(x))| ≤ absmax_block · δ' on this path: δ exact (torch, CUDA), 2δ with bitsandbytes' CPU kernel."""
    near = torch.device(device).type == "cpu" and uses_bitsandbytes(device, block_size)
    return max_error(signed) * (2 if near else 1)


def quantize_blockwise(x: Tensor, block_size: int = BLOCK_SIZE, *, signed: bool = True) -> tuple[Tensor, Tensor]:
    """(codes uint8 shaped like x, absmax float32 with one entry per block of the flattened x).

    With signed=False, x must be non-negative (negative values are clamped to 0).
    """
    bnb = _use_bnb(x, block_size)
    if bnb is not None:
        code = dynamic_map(signed, x.device)
        codes, state = bnb.quantize_blockwise(x.float().contiguous(), code=code, blocksize=block_size)
        return codes.view(x.shape), state.absmax
    return _quantize_torch(x, block_size, signed=signed)


def _blocks(values: Tensor, block_size: int) -> Tensor:
    """The flattened `values` cut into rows of `block_size` (the last one zero-padded)."""
    flat = values.reshape(-1)
    return torch.nn.functional.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)


def _unblocks(blocks: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """The inverse of `_blocks`: the first prod(shape) values, shaped `shape`."""
    return blocks.view(-1)[:math.prod(shape)].view(shape)


def _quantize_torch(x: Tensor, block_size: int, *, signed: bool) -> tuple[Tensor, Tensor]:
    """quantize_blockwise with the exact nearest code (bucketize on the map's midpoints)."""
    blocks = _blocks(x.float(), block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).clamp_(-1.0 if signed else 0.0, 1.0)
    codes = torch.bucketize(_unblocks(scaled, x.shape), _midpoints(signed, x.device)).to(torch.uint8)
    return codes, absmax


def zeros_blockwise(shape: tuple[int, ...] | torch.Size, block_size: int = BLOCK_SIZE, *, signed: bool = True,
                    device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(codes, absmax) of a zero tensor of `shape` — every code the map's 0, every absmax 0 — built without
    the float tensor (a new 8-bit moment of the 7b embedding would otherwise need 0.5 GiB of float32 zeros)."""
    zero = int((dynamic_map(signed) == 0).nonzero())
    numel = math.prod(shape)
    return (torch.full(tuple(shape), zero, dtype=torch.uint8, device=device),
            torch.zeros(-(-numel // block_size), dtype=torch.float32, device=device))


def dequantize_blockwise(
    codes: Tensor,
    absmax: Tensor,
    shape: tuple[int, ...] | torch.Size,
    block_size: int = BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
    *,
    signed: bool = True,
) -> Tensor:
    """map[codes] · absmax of each value's block, as a `dtype` tensor of `shape`."""
    bnb = _use_bnb(codes, block_size)
    if bnb is not None:
        code = dynamic_map(signed, codes.device)
        out = bnb.dequantize_blockwise(codes.contiguous(), absmax=absmax, code=code, blocksize=block_size)
        return out.view(shape).to(dtype)
    return _dequantize_torch(codes, absmax, shape, block_size, dtype, signed=signed)


def _dequantize_torch(codes: Tensor, absmax: Tensor, shape: tuple[int, ...] | torch.Size, block_size: int,
                      dtype: torch.dtype, *, signed: bool) -> Tensor:
    values = dynamic_map(signed, codes.device)[codes.reshape(-1).long()]
    return _unblocks(_blocks(values, block_size) * absmax[:, None], shape).to(dtype)


INT8_MAX = 127


def quantize_int8(x: Tensor, block_size: int = BLOCK_SIZE, *, stochastic: bool = False,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(codes int8 shaped like x, scale float32 per block = absmax / 127) of the linear map (module docstring);
    `stochastic` rounds each value down or up with `generator`'s uniforms, unbiased."""
    blocks = _blocks(x.float(), block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scale = absmax / INT8_MAX
    scaled = blocks / scale.clamp(min=torch.finfo(torch.float32).tiny)
    if stochastic:
        stochastic_round_(scaled, generator)
        edge = blocks.abs() == absmax  # where x/scale is ±127 up to float32 rounding: exactly ±127
        scaled.masked_fill_(edge & (blocks > 0), INT8_MAX).masked_fill_(edge & (blocks < 0), -INT8_MAX)
    else:
        scaled.round_()
    codes = _unblocks(scaled.clamp_(-INT8_MAX, INT8_MAX), x.shape).to(torch.int8)
    return codes, scale.view(-1)


def dequantize_int8(codes: Tensor, scale: Tensor, block_size: int = BLOCK_SIZE, dtype: torch.dtype = torch.float32) -> Tensor:
    """codes · scale of each value's block, as a `dtype` tensor shaped like `codes`."""
    return _unblocks(_blocks(codes.float(), block_size) * scale[:, None], codes.shape).to(dtype)
