"""Curvature estimates: Hessian-vector products and Hessian / Gauss-Newton diagonals, one interface for
every curvature optimizer (Sophia, AdaHessian). Pure torch on local tensors, no process groups; each
function takes a function that re-evaluates the loss (or the logits) and the parameters, and returns
one tensor per parameter. Gradients are taken with `torch.autograd.grad`, so `.grad` and
post-accumulate-grad hooks are never touched.

    hvp(loss_fn, params, vectors, method)      H v, by double backward or by a finite difference of gradients
    hutchinson_diag(loss_fn, params, samples)  E[u ⊙ H u], u Rademacher (Hutchinson 1990; AdaHessian, Sophia-H)
    gnb_diag(logits_fn, params, samples)       B · ĝ ⊙ ĝ, ĝ the gradient on labels sampled from the model
                                               (Gauss-Newton-Bartlett, Sophia-G)
    block_average(diag, block_size)            AdaHessian's spatial averaging over contiguous blocks

`method="autograd"` differentiates the gradient again (exact, but needs a twice-differentiable graph:
the math attention kernel, eager mode); `method="finite_difference"` takes (∇f(θ + εv) − ∇f(θ))/ε,
two ordinary backward passes, which works wherever training works (fused kernels, torch.compile).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("autograd", "finite_difference")
FD_EPS = 1e-3
"""Default ε of the finite-difference HVP: the error is O(ε · third derivative), the rounding O(u / ε)
(u the unit roundoff); 1e-3 balances them for float32 (u ≈ 6e-8) at unit-scale vectors."""


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _grads(loss: Tensor, params: Sequence[Tensor], **kwargs) -> list[Tensor]:
    return list(torch.autograd.grad(loss, params, **kwargs))


@torch.no_grad()
def _add_into(out: Sequence[Tensor] | None, grads: Sequence[Tensor]) -> None:
    if out is not None:
        for o, g in zip(out, grads):
            o.add_(g)


@torch.no_grad()
def _shifted_grads(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], vectors: Sequence[Tensor], eps: float) -> list[Tensor]:
    """∇f(θ + ε v), with θ restored exactly afterwards (a saved copy, not a subtraction)."""
    saved = [p.detach().clone() for p in params]
    for p, v in zip(params, vectors):
        p.add_(v.to(p.dtype), alpha=eps)
    try:
        with torch.enable_grad():
            return _grads(loss_fn(), params)
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)


def hvp(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    method: str = "autograd",
    eps: float = FD_EPS,
) -> list[Tensor]:
    """H v, H the Hessian of `loss_fn()` in `params`: by double backward (Pearlmutter 1994) or by the
    forward difference (∇f(θ + εv) − ∇f(θ))/ε, whose error is O(ε)."""
    _check_method(method)
    if method == "autograd":
        grads = _grads(loss_fn(), params, create_graph=True)
        return _grads(grads, params, grad_outputs=list(vectors))
    base = _grads(loss_fn(), params)
    return [(shifted - g) / eps for shifted, g in zip(_shifted_grads(loss_fn, params, vectors, eps), base)]


def rademacher_like(params: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """Independent ±1 entries shaped like each parameter; `generator` lives on the parameters' device."""
    return [torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype).mul_(2).sub_(1) for p in params]


def hutchinson_diag(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    samples: int = 1,
    method: str = "autograd",
    eps: float = FD_EPS,
    generator: torch.Generator | None = None,
    grad_out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """diag(H) ≈ (1/S) Σₛ uₛ ⊙ (H uₛ), uₛ Rademacher (Hutchinson 1990; Bekas et al. 2007): unbiased, since
    E[u uᵀ] = I. The loss is differentiated once; each sample costs one more backward. That first
    gradient ∇f(θ) is added into `grad_out` when given, so a training step can use it instead of taking
    its own (as AdaHessian's official code does, from one backward with create_graph)."""
    _check_method(method)
    if samples < 1:
        raise ValueError(f"samples must be ≥ 1, got {samples}")
    total = [torch.zeros_like(p) for p in params]
    if method == "autograd":
        grads = _grads(loss_fn(), params, create_graph=True)
        for s in range(samples):
            u = rademacher_like(params, generator)
            hu = _grads(grads, params, grad_outputs=u, retain_graph=s < samples - 1)
            for t, ui, hui in zip(total, u, hu):
                t.addcmul_(ui, hui)
        grads = [g.detach() for g in grads]
    else:
        base = _grads(loss_fn(), params)
        for _ in range(samples):
            u = rademacher_like(params, generator)
            for t, ui, shifted, g in zip(total, u, _shifted_grads(loss_fn, params, u, eps), base):
                t.addcmul_(ui, shifted.sub_(g), value=1 / eps)
        grads = base
    _add_into(grad_out, grads)
    return [t.div_(samples) for t in total]


def gnb_diag(
    logits_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    samples: int = 1,
    generator: torch.Generator | None = None,
    train_loss: Callable[[Tensor], Tensor] | None = None,
    grad_out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Gauss-Newton-Bartlett estimate of the Gauss-Newton diagonal of the mean cross-entropy (Liu et al.,
    ICLR 2024, "Sophia", Algorithm 2): labels ŷ ~ softmax(logits) are sampled from the model itself,
    ĝ = ∇ (1/B) Σ_b CE(logits_b, ŷ_b), estimate B · ĝ ⊙ ĝ with B the number of predictions (tokens).
    Unbiased for diag((1/B) Σ_b J_bᵀ (diag(p_b) − p_b p_bᵀ) J_b), because E_ŷ[∇ CE(logits_b, ŷ)] = 0.
    `logits_fn()` returns logits [..., vocab]; the forward runs once, each sample costs one backward;
    `generator` lives on the logits' device. With `train_loss` (logits → the training loss) and `grad_out`,
    the training loss's gradient is taken from the same forward and added into `grad_out`, so a training
    step that is also an estimate step runs one forward, not two."""
    if samples < 1:
        raise ValueError(f"samples must be ≥ 1, got {samples}")
    if (train_loss is None) != (grad_out is None):
        raise ValueError("train_loss and grad_out go together: the gradient of train_loss lands in grad_out")
    logits = logits_fn()
    flat = logits.flatten(0, -2).float()
    probs = flat.detach().softmax(-1)
    batch = flat.shape[0]
    total = [torch.zeros_like(p) for p in params]
    for s in range(samples):
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        g = _grads(F.cross_entropy(flat, labels), params, retain_graph=train_loss is not None or s < samples - 1)
        for t, gi in zip(total, g):
            t.addcmul_(gi, gi, value=batch)
    if train_loss is not None:
        _add_into(grad_out, _grads(train_loss(logits), params))
    return [t.div_(samples) for t in total]


def block_average(diag: Tensor, block_size: int) -> Tensor:
    """Each entry replaced by the mean of its block of `block_size` contiguous entries of the flattened
    tensor (the last block may be shorter): AdaHessian's spatial averaging (Yao et al., AAAI 2021, §3.2)."""
    if block_size < 1:
        raise ValueError(f"block_size must be ≥ 1, got {block_size}")
    flat = diag.reshape(-1)
    n = flat.numel()
    full = n - n % block_size
    out = torch.empty_like(flat)
    if full:
        blocks = flat[:full].view(-1, block_size)
        out[:full] = blocks.mean(1, keepdim=True).expand_as(blocks).reshape(-1)
    if full < n:
        out[full:] = flat[full:].mean()
    return out.view_as(diag)
