"""Federated algorithms as small named pieces around one local-step loop (`client.train_client`).

Every algorithm is four pieces, and nothing else differs between them:

    gradient(r, backward)    how the local gradient is measured (FedSpeed: a sharpness-aware second pass)
    correct(r)               the gradient transform applied to p.grad before the base optimizer's step
    finish(r)                after the K local steps: (upload to the server, this client's new state)
    server_update(...)       how the server folds the mean upload into the global model and its own state

Pure torch on local tensors, no Ray and no process groups. Model-sized state travels as flat vectors
(dicts of 1-D tensors, keyed by name) so that it can be stored, summed and checkpointed as is; inside
a client round `LocalRound` holds per-parameter views of them (no copies).

    round t:  server xᵗ, server state ─┬─> client i: K × [gradient → correct → base optimizer step]
                                       │            finish → upload uᵢ, new client state sᵢ
              xᵗ⁺¹, server state  <────┴── server_update(xᵗ, mean over active clients of uᵢ)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Flat = dict[str, torch.Tensor]


def views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-parameter views of a flat vector laid out as `like` (torch.nn.utils.parameters_to_vector order)."""
    return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in like]), like)]


@torch.no_grad()
def load_flat(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy a flat vector into the parameters (unlike torch's vector_to_parameters, which aliases it)."""
    for p, v in zip(params, views(flat, params)):
        p.copy_(v)


@dataclass
class LocalRound:
    """What one client's local training sees: per-parameter tensors of the model and of the states."""

    params: list[torch.Tensor]
    """The model's parameters, trained in place (x)."""
    start: list[torch.Tensor]
    """The server model xᵗ the round started from."""
    client: dict[str, list[torch.Tensor]]
    """This client's state (zeros before its first round)."""
    server: dict[str, list[torch.Tensor]]
    """The state the server broadcasts with the model."""
    lr: float
    """The local learning rate η of this round."""
    steps: int
    """K, the local steps of this round."""

    def drift(self) -> list[torch.Tensor]:
        """x − xᵗ."""
        return [p.detach() - s for p, s in zip(self.params, self.start)]


class Algorithm:
    """FedAvg (McMahan et al., AISTATS 2017): K local steps of the base optimizer, the server averages
    the clients' models: xᵗ⁺¹ = xᵗ + η_g · mean_i (xᵢ,K − xᵗ) (η_g = 1 is plain averaging)."""

    client_state: tuple[str, ...] = ()
    """Names of the per-client state vectors (kept in the client-state store between rounds)."""
    server_state: tuple[str, ...] = ()
    """Names of the server state vectors (broadcast to the clients every round)."""

    def __init__(self, *, server_lr: float = 1.0):
        self.server_lr = server_lr

    def gradient(self, r: LocalRound, backward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Fill p.grad with ∇fᵢ(x) on the current batch; returns the batch loss."""
        return backward()

    def correct(self, r: LocalRound) -> None:
        """The gradient transform (in place on p.grad); none for FedAvg."""

    def finish(self, r: LocalRound) -> tuple[Flat, Flat]:
        """(upload, new client state) after the K local steps."""
        return {"delta": _flat(r.drift())}, {}

    def server_update(self, x: torch.Tensor, state: Flat, mean: Flat, participation: float) -> tuple[torch.Tensor, Flat]:
        """(xᵗ⁺¹, new server state) from the mean upload of the active clients; participation = |S| / N."""
        return x + self.server_lr * mean["delta"], state


class FedProx(Algorithm):
    """FedProx (Li et al., MLSys 2020): the local objective gains (μ/2)‖x − xᵗ‖², so the gradient
    becomes g + μ(x − xᵗ). μ = 0 is FedAvg."""

    def __init__(self, *, mu: float, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        self.mu = mu

    def correct(self, r: LocalRound) -> None:
        for p, d in zip(r.params, r.drift()):
            p.grad.add_(d, alpha=self.mu)


class Scaffold(Algorithm):
    """SCAFFOLD (Karimireddy et al., ICML 2020), Algorithm 1 with option II for the control variates:
    local direction g − cᵢ + c; after K steps of rate η, cᵢ⁺ = cᵢ − c + (xᵗ − xᵢ,K)/(Kη); the client
    uploads Δyᵢ = xᵢ,K − xᵗ and Δcᵢ = cᵢ⁺ − cᵢ; the server sets xᵗ⁺¹ = xᵗ + η_g·mean Δyᵢ and
    c ← c + (|S|/N)·mean Δcᵢ, which keeps c = mean over all N clients of cᵢ."""

    client_state = ("c",)
    server_state = ("c",)

    def correct(self, r: LocalRound) -> None:
        for p, ci, c in zip(r.params, r.client["c"], r.server["c"]):
            p.grad.sub_(ci).add_(c)

    def finish(self, r: LocalRound) -> tuple[Flat, Flat]:
        drift = _flat(r.drift())
        ci, c = _flat(r.client["c"]), _flat(r.server["c"])
        new_ci = ci - c - drift / (r.steps * r.lr)
        return {"delta": drift, "dc": new_ci - ci}, {"c": new_ci}

    def server_update(self, x, state, mean, participation):
        return x + self.server_lr * mean["delta"], {"c": state["c"] + participation * mean["dc"]}


class FedSpeed(Algorithm):
    """FedSpeed (Sun et al., ICLR 2023) in the form of its official code (FL-Simulator), written in the
    paper's notation with prox-correction ĝᵢ and proximal weight 1/λ:

        g₁ = ∇fᵢ(x);  g₂ = ∇fᵢ(x + ρ·g₁/‖g₁‖);  g̃ = (1−α)·g₁ + α·g₂       (the code uses α = 1)
        local direction  g̃ − ĝᵢ + (1/λ)(x − xᵗ)                           (as in the paper, Algorithm 1)
        after K steps    ĝᵢ ← ĝᵢ − (1/λ)(xᵢ,K − xᵗ)
        server           ḡ = mean over ALL N clients of ĝᵢ (kept as a running mean, O(d) memory);
                         xᵗ⁺¹ = xᵗ + η_g·(mean_active(xᵢ,K − xᵗ) − λ·ḡ)

    The code's hᵢ is −λ·ĝᵢ and its λ is our 1/λ: its server step wᵗ⁺¹ = mean_active wᵢ,K + mean_all hᵢ
    is the one above with η_g = 1. The paper's server averages x̂ᵢ = xᵢ,K − λ·ĝᵢ over the ACTIVE clients
    only; with 10% participation that average of per-client corrections is noisy, so we follow the code.
    With ρ = 0 and ĝᵢ held at zero a round is FedProx with μ = 1/λ."""

    client_state = ("g_hat",)
    server_state = ("g_bar",)

    def __init__(self, *, rho: float, lam: float, alpha: float = 1.0, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        self.rho, self.lam, self.alpha = rho, lam, alpha

    def gradient(self, r: LocalRound, backward: Callable[[], torch.Tensor]) -> torch.Tensor:
        loss = backward()
        if self.rho == 0:
            return loss
        g1 = [p.grad.clone() for p in r.params]
        scale = self.rho / (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g1])) + 1e-12)
        with torch.no_grad():
            for p, g in zip(r.params, g1):
                p.add_(g, alpha=scale)
        backward()  # g₂ at the perturbed point
        with torch.no_grad():
            for p, g in zip(r.params, g1):
                p.sub_(g, alpha=scale)
                if self.alpha != 1:
                    p.grad.mul_(self.alpha).add_(g, alpha=1 - self.alpha)
        return loss

    def correct(self, r: LocalRound) -> None:
        for p, g_hat, d in zip(r.params, r.client["g_hat"], r.drift()):
            p.grad.sub_(g_hat).add_(d, alpha=1 / self.lam)

    def finish(self, r: LocalRound) -> tuple[Flat, Flat]:
        drift = _flat(r.drift())
        change = -drift / self.lam
        return {"delta": drift, "dg": change}, {"g_hat": _flat(r.client["g_hat"]) + change}

    def server_update(self, x, state, mean, participation):
        g_bar = state["g_bar"] + participation * mean["dg"]
        return x + self.server_lr * (mean["delta"] - self.lam * g_bar), {"g_bar": g_bar}


def mean_of(uploads: list[Flat]) -> Flat:
    """The mean upload of the active clients, summed in the given order (fixed order, reproducible bits)."""
    total = {k: v.clone() for k, v in uploads[0].items()}
    for upload in uploads[1:]:
        for k, v in upload.items():
            total[k] += v
    return {k: v / len(uploads) for k, v in total.items()}


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedspeed")
