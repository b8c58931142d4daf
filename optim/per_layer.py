"""Per-layer weight updates: the optimizer step of each parameter runs inside backward, as soon as its
gradient is accumulated, and the gradient is freed at once, so the gradients of the whole model never
exist together (the memory trick behind GaLore's LLaMA-7B on a 24 GB GPU; Zhao et al., ICML 2024).

Built on `Tensor.register_post_accumulate_grad_hook` (`on_accumulated_grad`, which a distributor uses
too, to send each gradient on as soon as it exists). A `ParamwiseOptimizer` (AdamW, GradNormLoRP, ...)
steps the one parameter by its `step_param(p, group)`; any other torch optimizer (galore-torch's) is
stepped with its param groups narrowed to that parameter for the call, so it keeps one state, one
`state_dict` and its LR scheduler.

Gradient accumulation over k micro-batches: the hook fires on every backward; with
`accumulation_steps=k` a parameter is stepped (and its gradient freed) on every k-th firing only, and
otherwise its gradient is kept and summed by autograd, exactly like k calls of `loss.backward()`
followed by `optimizer.step()`. Between micro-batches the kept gradients do coexist: the memory
saving is complete only for k = 1. Call backward exactly k times per optimizer step. Anything that
needs all gradients at once (global-norm clipping, a finite check) cannot be combined with this.
"""

import threading
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .state import ParamwiseOptimizer


class PerLayerHandle:
    """Returned by `attach_per_layer_step`; `remove()` detaches the hooks."""

    def __init__(self, hooks: list):
        self._hooks = hooks

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class _EveryKth:
    """Post-accumulate-grad hook: call `fn(p)` on every `every`-th accumulation of p's gradient."""

    def __init__(self, fn: Callable[[Tensor], None], every: int):
        self.fn, self.every, self.calls = fn, every, 0

    def __call__(self, p: Tensor) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            self.fn(p)


def on_accumulated_grad(params: Iterable[Tensor], fn: Callable[[Tensor], None], *, accumulation_steps: int = 1) -> PerLayerHandle:
    """Call `fn(p)` inside backward once p's gradient holds the sum of `accumulation_steps` micro-batches
    (module docstring), for every trainable p of `params`."""
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
    return PerLayerHandle([p.register_post_accumulate_grad_hook(_EveryKth(fn, accumulation_steps))
                           for p in params if p.requires_grad])


_LOCK = threading.Lock()  # autograd may run hooks of parameters on different devices in different threads


def step_one_param(optimizer: torch.optim.Optimizer, p: Tensor, group: dict) -> None:
    """Step only `p` (of `group`): `step_param` of a ParamwiseOptimizer, else a narrowed `step()`."""
    if isinstance(optimizer, ParamwiseOptimizer):
        optimizer.step_param(p, group)
    else:
        _narrowed_step(optimizer, p, group)


def _narrowed_step(optimizer: torch.optim.Optimizer, p: Tensor, group: dict) -> None:
    """optimizer.step() with every param group emptied except `group`, which holds only `p`."""
    with _LOCK:
        saved = [g["params"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["params"] = [p] if g is group else []
        try:
            optimizer.step()
        finally:
            for g, params in zip(optimizer.param_groups, saved):
                g["params"] = params


def attach_per_layer_step(
    model_or_params: nn.Module | Iterable[Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    accumulation_steps: int = 1,
) -> PerLayerHandle:
    """Runs `optimizer`'s step for each trainable parameter inside backward and frees its gradient
    (module docstring)."""
    params = list(model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params)
    group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
    for p in params:
        if p.requires_grad and p not in group_of:
            raise ValueError(f"parameter of shape {tuple(p.shape)} is trainable but not in the optimizer")

    def step(p: Tensor) -> None:
        step_one_param(optimizer, p, group_of[p])
        p.grad = None

    return on_accumulated_grad(params, step, accumulation_steps=accumulation_steps)
