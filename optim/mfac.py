"""Blockwise M-FAC (Frantar, Kurtic, Alistarh; NeurIPS 2021, "M-FAC: Efficient Matrix-Free Approximations of
Second-Order Information", §3 and the optimizer of §5), optionally damped by Gradient-Normalized
Smoothness (Semenov, Jaggi, Doikov, 2025, "Gradient-Normalized Smoothness for Optimization with
Approximate Hessians", the adaptive gradient-regularized Newton method).

Each parameter is cut into blocks of at most `block_size` contiguous entries (of the flattened tensor);
each block keeps a sliding window of its last m = `window` gradients G (m × b, a ring buffer) and
their Gram matrix K = G Gᵀ. The empirical Fisher of a block and its inverse by Woodbury are

    F = λ I + (1/m) Σᵢ gᵢ gᵢᵀ = λ I + (1/m) Gᵀ G,      F⁻¹ x = (x − Gᵀ (m λ I + K)⁻¹ G x) / λ

so a product costs O(b m + m³) and adding a gradient (one row of G and of K) O(b m); slots not yet
filled hold zeros, as in the official code. `step()` adds the current gradient g (+ wd · θ, coupled
L2 decay as in the official code) to the window, then moves θ ← θ − lr · F⁻¹ g (with momentum μ:
u ← μ u + (1 − μ) F⁻¹ g, θ ← θ − lr · u, the official form). The official code flattens the whole
model into one block; blocks keep the window's memory per worker ≈ total / N when they are sharded.

damping="gns": λ = ‖g‖ / γ and a trial step x⁺ = x − lr · F_λ⁻¹ g is accepted if

    f(x) − f(x⁺) ≥ ‖∇f(x⁺)‖² / (8 λ)     (then γ ← 2γ)      else γ ← γ/2 and retry from x,

up to GNS_MAX_TRIES trials (after which x is kept). `step(closure)` needs a closure that re-evaluates
the loss and the gradients (into `.grad`) on the same batch; it is called once per trial, and once at x
first unless the caller passes `start` = (f(x), ‖∇f(x)‖²) with ∇f(x) already in `.grad` (a training loop
that has just run that pass). The closure returns f, or (f, ‖∇f‖²) where the norm is not this
optimizer's alone (a distributor that shards the parameters adds the shards' sums up); otherwise the
norm is over this optimizer's parameters. The paper's method is lr = 1.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .rounding import write_weight_
from .state import ParamwiseOptimizer, state_dtype

GNS_GAMMA0 = 1.0
"""γ before the first step (λ = ‖g‖ at the first trial)."""
GNS_MAX_TRIES = 10
"""Trials per step before giving up and keeping x (γ has been halved this many times)."""


def check_options(*, window: int, damping: float | str, momentum: float, block_size: int, weight_decay: float = 0.0) -> None:
    """The one check of M-FAC's options, GNS's rule included: damping="gns" takes the paper's plain step
    (no momentum, no weight decay)."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int ≥ 1, got {window!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int ≥ 1, got {block_size!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay}")
    if damping == "gns":
        if momentum or weight_decay:
            raise ValueError("damping=gns takes the paper's plain step: momentum and weight_decay must be 0")
    elif isinstance(damping, str) or not damping > 0:
        raise ValueError(f"damping must be > 0 or 'gns', got {damping!r}")


def _blocks(numel: int, block_size: int) -> tuple[int, int]:
    """(number of blocks, block length) of a parameter of `numel` entries; the last block is zero-padded."""
    length = min(block_size, numel)
    return -(-numel // length), length


class MFAC(ParamwiseOptimizer):
    """Blockwise M-FAC (module docstring); `damping` a positive number or "gns"."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        window: int = 32,
        damping: float | str = 1e-5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        block_size: int = 16384,
    ):
        if not lr >= 0:
            raise ValueError(f"lr must be ≥ 0, got {lr}")
        check_options(window=window, damping=damping, momentum=momentum, weight_decay=weight_decay, block_size=block_size)
        super().__init__(params, dict(lr=lr, window=window, damping=damping, momentum=momentum,
                                      weight_decay=weight_decay, block_size=block_size))

    @property
    def gns(self) -> bool:
        return any(group["damping"] == "gns" for group in self.param_groups)

    def _state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            n_blocks, length = _blocks(p.numel(), group["block_size"])
            dtype, m = state_dtype(p), group["window"]
            state.update(
                step=torch.tensor(0, dtype=torch.int64),
                slot=torch.tensor(0, dtype=torch.int64),  # the ring buffer's next row
                grads=torch.zeros(n_blocks, m, length, dtype=dtype, device=p.device),
                gram=torch.zeros(n_blocks, m, m, dtype=dtype, device=p.device),
            )
            if group["momentum"]:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype)
        return state

    def state_numel(self, p: Tensor, group: dict) -> int:
        """Elements of state per parameter (window, Gram matrices, momentum): the cost of block ownership."""
        n_blocks, length = _blocks(p.numel(), group["block_size"])
        m = group["window"]
        return n_blocks * m * (length + m) + (p.numel() if group["momentum"] else 0)

    # ---- the window and the inverse ----
    @staticmethod
    def _as_blocks(x: Tensor, state: dict) -> Tensor:
        """x flattened, zero-padded and viewed as (blocks, block length)."""
        n_blocks, _, length = state["grads"].shape
        flat = x.reshape(-1).to(state["grads"].dtype)
        return torch.nn.functional.pad(flat, (0, n_blocks * length - flat.numel())).view(n_blocks, length)

    @staticmethod
    def _push(state: dict, g: Tensor) -> None:
        """Replace the oldest gradient of every block's window by g's block: one row of G and of K."""
        grads, gram = state["grads"], state["gram"]
        slot = int(state["slot"])  # a CPU tensor: no device sync
        grads[:, slot] = g
        row = torch.bmm(grads, g.unsqueeze(-1)).squeeze(-1)
        gram[:, slot, :] = row
        gram[:, :, slot] = row
        state["slot"].fill_((slot + 1) % grads.shape[1])

    @staticmethod
    def _inverse_times(state: dict, x: Tensor, damping: float) -> Tensor:
        """F⁻¹ x per block by Woodbury; the m × m system is solved in float64."""
        grads, gram = state["grads"], state["gram"]
        m = grads.shape[1]
        system = gram.double() + (m * damping) * torch.eye(m, dtype=torch.float64, device=gram.device)
        coef = torch.cholesky_solve(torch.bmm(grads, x.unsqueeze(-1)).double(), torch.linalg.cholesky(system))
        return (x - torch.bmm(grads.transpose(1, 2), coef.to(x.dtype)).squeeze(-1)) / damping

    def _direction(self, p: Tensor, state: dict, g: Tensor, group: dict, damping: float) -> Tensor:
        """lr-free update direction of p, shaped like p: F⁻¹ g (through the momentum buffer if any)."""
        d = self._inverse_times(state, g, damping).reshape(-1)[: p.numel()].view_as(p)
        if group["momentum"]:
            d = state["momentum_buffer"].mul_(group["momentum"]).add_(d, alpha=1 - group["momentum"])
        return d

    # ---- steps ----
    def _gradient_blocks(self, p: Tensor, group: dict, state: dict) -> Tensor:
        g = p.grad if not group["weight_decay"] else p.grad + group["weight_decay"] * p
        return self._as_blocks(g, state)

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict) -> None:
        """The update of one parameter of `group` (fixed damping): window update, then θ ← θ − lr F⁻¹g."""
        if group["damping"] == "gns":
            raise RuntimeError("MFAC with damping='gns' steps all parameters together: call step(closure)")
        state = self._state(p, group)
        state["step"] += 1
        g = self._gradient_blocks(p, group, state)
        self._push(state, g)
        direction = self._direction(p, state, g, group, group["damping"])
        w = p.to(direction.dtype)  # p itself for float32/float64 weights
        write_weight_(p, w.add_(direction, alpha=-group["lr"]))  # stochastic rounding into bf16 weights

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor | tuple[Tensor, Tensor]] | None = None,
             start: tuple[Tensor, Tensor] | None = None) -> Tensor | None:
        """A step; with damping="gns" the acceptance rule's (module docstring), else a plain step of the
        fixed damping. `start`: (f(x), ‖∇f(x)‖²) when `.grad` already holds ∇f(x)."""
        if self.gns:
            if closure is None:
                raise RuntimeError("MFAC with damping='gns' needs step(closure): the acceptance rule re-evaluates the loss")
            return self._gns_step(closure, start)
        return super().step(closure)

    def _evaluate(self, closure, params: list[tuple[Tensor, dict]]) -> tuple[Tensor, Tensor]:
        """(f, ‖∇f‖²) at the current weights, from `closure` (module docstring)."""
        with torch.enable_grad():
            result = closure()
        if isinstance(result, tuple):
            return result
        norm_sq = sum((p.grad.double().square().sum() for p, _ in params if p.grad is not None), torch.zeros((), dtype=torch.float64))
        return result, norm_sq

    def _gns_step(self, closure, start: tuple[Tensor, Tensor] | None) -> Tensor:
        params = [(p, group) for group in self.param_groups for p in group["params"]]
        loss, grad_norm_sq = start if start is not None else self._evaluate(closure, params)
        params = [(p, group) for p, group in params if p.grad is not None]
        grads = []
        for p, group in params:
            state = self._state(p, group)
            state["step"] += 1
            grads.append(self._gradient_blocks(p, group, state))
            self._push(state, grads[-1])
        grad_norm = grad_norm_sq.sqrt()
        gamma = self.state["gns"].setdefault("gamma", torch.tensor(GNS_GAMMA0, dtype=torch.float64))
        start_weights = [p.detach().clone() for p, _ in params]
        for _ in range(GNS_MAX_TRIES):
            damping = float(grad_norm / gamma)
            for (p, group), g, x in zip(params, grads, start_weights):
                p.copy_(x).add_(self._direction(p, self.state[p], g, group, damping).to(p.dtype), alpha=-group["lr"])
            trial, trial_norm_sq = self._evaluate(closure, params)
            if float(loss) - float(trial) >= float(trial_norm_sq) / (8 * damping):
                gamma.mul_(2)
                return loss
            gamma.div_(2)
        for (p, _), x in zip(params, start_weights):
            p.copy_(x)
        return loss

    def metrics(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{"gns_gamma": (γ, 1)} with damping='gns' (every shard holds the same γ); else nothing."""
        if "gamma" not in self.state.get("gns", {}):
            return {}
        one = torch.ones((), dtype=torch.float64)
        return {"gns_gamma": (self.state["gns"]["gamma"].clone(), one)}

