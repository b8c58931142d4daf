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
the loss and the gradients (into `.grad`) on the same batch; it is called once at x, then once per
trial. The paper's method is lr = 1. Norms are over all parameters of the optimizer; a distributor
that shards the parameters sets `reduce_sum` to add the per-shard sums up.
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
        if not lr >= 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"need lr ≥ 0, weight_decay ≥ 0, 0 ≤ momentum < 1; got {lr}, {weight_decay}, {momentum}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int ≥ 1, got {window!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int ≥ 1, got {block_size!r}")
        if damping == "gns":
            if momentum or weight_decay:
                raise ValueError("damping='gns' takes the paper's plain step: momentum and weight_decay must be 0")
        elif isinstance(damping, str) or not damping > 0:
            raise ValueError(f"damping must be > 0 or 'gns', got {damping!r}")
        super().__init__(params, dict(lr=lr, window=window, damping=damping, momentum=momentum,
                                      weight_decay=weight_decay, block_size=block_size))
        self.reduce_sum: Callable[[Tensor], Tensor] = lambda t: t
        """Sum of a per-shard partial sum over all shards (identity unless a distributor shards the parameters)."""

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
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        if self.gns:
            if closure is None:
                raise RuntimeError("MFAC with damping='gns' needs step(closure): the acceptance rule re-evaluates the loss")
            return self._gns_step(closure)
        return super().step(closure)

    def _grad_norm_sq(self, params: list[tuple[Tensor, dict]]) -> Tensor:
        local = sum((p.grad.double().square().sum() for p, _ in params), torch.zeros((), dtype=torch.float64))
        return self.reduce_sum(local)

    def _gns_step(self, closure: Callable[[], Tensor]) -> Tensor:
        with torch.enable_grad():
            loss = closure()
        params = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = []
        for p, group in params:
            state = self._state(p, group)
            state["step"] += 1
            grads.append(self._gradient_blocks(p, group, state))
            self._push(state, grads[-1])
        grad_norm = self._grad_norm_sq(params).sqrt()
        gamma = self.state["gns"].setdefault("gamma", torch.tensor(GNS_GAMMA0, dtype=torch.float64))
        start = [p.detach().clone() for p, _ in params]
        for _ in range(GNS_MAX_TRIES):
            damping = float(grad_norm / gamma)
            for (p, group), g, x in zip(params, grads, start):
                p.copy_(x).add_(self._direction(p, self.state[p], g, group, damping).to(p.dtype), alpha=-group["lr"])
            with torch.enable_grad():
                trial = closure()
            if float(loss) - float(trial) >= float(self._grad_norm_sq(params)) / (8 * damping):
                gamma.mul_(2)
                return loss
            gamma.div_(2)
        for (p, _), x in zip(params, start):
            p.copy_(x)
        return loss

    def metrics(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{"gns_gamma": (γ, 1)} with damping='gns' (every shard holds the same γ); else nothing."""
        if "gamma" not in self.state.get("gns", {}):
            return {}
        one = torch.ones((), dtype=torch.float64)
        return {"gns_gamma": (self.state["gns"]["gamma"].clone(), one)}

