"""INT8 weights (Q-GaLore's storage, Zhang et al. 2024, arXiv 2407.08296): a projected matrix is held as
int8 codes with a float32 scale per block (`quantize.quantize_int8`, the one quantizer), 1.016 bytes per
value instead of bf16's 2, and trained without any higher-precision copy.

`Int8Weight` is a tensor that reads as its dequantized matrix (in the model's dtype) and holds only the
codes and scales. A linear layer with one (`F.linear` on it) dequantizes the matrix into the input's dtype
for the product and drops it; backward dequantizes again (under activation checkpointing, the block's
recomputed forward does as well), so at most the matrices of the running layer exist in full. The
gradient is an ordinary dense tensor with respect to the dequantized matrix: the optimizer (per-layer: in
the parameter's hook, inside backward) computes the new value in float32 and writes it back with
`write_`, stochastic rounding onto the int8 grid (unbiased: E[new weight] = the value written).

Every other read (`p.float()`, norms, products) sees the dequantized matrix; writes other than `write_` and
`copy_` (round to nearest: exact for a dequantized INT8 tensor) are refused, so no update can land in a
temporary copy and vanish. In a state dict an INT8 weight `w` is the pair `w_codes` (int8) and `w_scale`
(float32), plain tensors any checkpoint format stores; loading such a pair restores it exactly
(`quantize_weights_` installs the hooks), and `dequantized_state_dict` turns a saved one into ordinary
weights (export).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from .quantize import BLOCK_SIZE, dequantize_int8, quantize_int8

aten = torch.ops.aten
CODES, SCALE = "_codes", "_scale"
"""Suffixes of an INT8 weight's two tensors in a state dict."""


class Int8Weight(torch.Tensor):
    """A matrix stored as int8 codes + per-block float32 scales that reads as `dtype` (module docstring)."""

    @staticmethod
    def __new__(cls, codes: Tensor, scale: Tensor, dtype: torch.dtype, block_size: int = BLOCK_SIZE):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype, device=codes.device)

    def __init__(self, codes: Tensor, scale: Tensor, dtype: torch.dtype, block_size: int = BLOCK_SIZE):
        self.codes, self.scale, self.block_size = codes, scale, block_size

    @classmethod
    def from_float(cls, w: Tensor, block_size: int = BLOCK_SIZE, dtype: torch.dtype | None = None) -> Int8Weight:
        """`w` quantized to nearest; reads as `dtype` (default: w's)."""
        return cls(*quantize_int8(w, block_size), dtype or w.dtype, block_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """codes · scale as an ordinary tensor of `dtype` (default: the dtype it reads as)."""
        return dequantize_int8(self.codes, self.scale, self.block_size, dtype or self.dtype)

    @torch.no_grad()
    def write_(self, value: Tensor, generator: torch.Generator | None = None) -> None:
        """self ← value with stochastic rounding onto the int8 grid (new per-block scales), `generator`'s bits."""
        codes, scale = quantize_int8(value, self.block_size, stochastic=True, generator=generator)
        self.codes.copy_(codes)
        self.scale.copy_(scale)

    def _set(self, src: Tensor) -> None:
        """copy_: the codes and scales of an Int8Weight, else `src` quantized to nearest."""
        codes, scale = (src.codes, src.scale) if isinstance(src, Int8Weight) else quantize_int8(src, self.block_size)
        self.codes.copy_(codes)
        self.scale.copy_(scale)

    def __repr__(self) -> str:
        return f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, block_size={self.block_size})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return _Int8Linear.apply(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            w = args[0]
            return Int8Weight(w.codes, w.scale, w.dtype, w.block_size)
        if func is aten.copy_.default and isinstance(args[0], Int8Weight):
            args[0]._set(args[1])
            return args[0]
        for i, a in enumerate(func._schema.arguments):  # an input of the op that it writes or returns a view of
            if a.alias_info is not None and isinstance(args[i] if i < len(args) else kwargs.get(a.name), Int8Weight):
                raise NotImplementedError(f"{func}: an INT8 weight is read whole (its dequantized copy) and written only by "
                                      f"write_ or copy_; in-place ops and views of it are not supported")
        args, kwargs = tree_map_only(Int8Weight, Int8Weight.dequantize, (args, kwargs))
        return func(*args, **kwargs)


class _Int8Linear(torch.autograd.Function):
    """y = x Wᵀ (+ b) with W dequantized into x's dtype in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Int8Weight, bias: Tensor | None = None) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias = ctx.saved_tensors
        grad_x = grad @ weight.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad.flatten(0, -2).mT @ x.flatten(0, -2) if ctx.needs_input_grad[1] else None
        grad_b = grad.flatten(0, -2).sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_x, None if grad_w is None else grad_w.to(weight.dtype), grad_b


def quantize_weights_(model: nn.Module, targets: str, block_size: int = BLOCK_SIZE) -> list[str]:
    """Replace every 2-D parameter of `model` whose name matches the regex `targets` (re.search) by an
    INT8 weight (to nearest, reading as its dtype) in place, releasing the old parameter's storage, and make
    the state dict of each owning module store codes and scales (module docstring). Returns the names
    replaced; ValueError if none matches."""
    names = []
    for name, module in list(model.named_modules()):
        for pname, p in list(module.named_parameters(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            if not re.search(targets, full) or isinstance(p.data, Int8Weight):
                continue
            if p.dim() != 2:
                raise ValueError(f"INT8 weight target {full!r} is not 2-D (shape {tuple(p.shape)})")
            with torch.no_grad():
                setattr(module, pname, nn.Parameter(Int8Weight.from_float(p.detach(), block_size), requires_grad=p.requires_grad))
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)  # freed now, even if a builder still holds p
            names.append(full)
        if any(isinstance(p, Int8Weight) for p in module.parameters(recurse=False)) and not hasattr(module, "_int8_hooks"):
            module._int8_hooks = (module._register_state_dict_hook(_store_codes),
                                  module._register_load_state_dict_pre_hook(_load_codes, with_module=True))
    if not names:
        raise ValueError(f"the INT8 weight target rule {targets!r} matches no parameter")
    return names


def _store_codes(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    for pname, p in module.named_parameters(recurse=False):
        if isinstance(p, Int8Weight) and prefix + pname in state:
            w = state.pop(prefix + pname)
            state[prefix + pname + CODES], state[prefix + pname + SCALE] = w.codes, w.scale


def _load_codes(module: nn.Module, state: dict, prefix: str, *args) -> None:
    for pname, p in module.named_parameters(recurse=False):
        key = prefix + pname
        if isinstance(p, Int8Weight) and key + CODES in state:
            codes, scale = state.pop(key + CODES), state.pop(key + SCALE)
            state[key] = Int8Weight(codes, scale, p.dtype, p.block_size)


def dequantized_state_dict(state: dict[str, Tensor], block_size: int = BLOCK_SIZE,
                           dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """`state` with every (w_codes, w_scale) pair replaced by w, dequantized into `dtype`; other tensors kept."""
    out = {}
    for key, value in state.items():
        if key.endswith(SCALE) and key[:-len(SCALE)] + CODES in state:
            continue
        if key.endswith(CODES) and key[:-len(CODES)] + SCALE in state:
            name = key[:-len(CODES)]
            out[name] = dequantize_int8(value, state[name + SCALE], block_size, dtype)
        else:
            out[key] = value
    return out
