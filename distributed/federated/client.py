"""The one local-step loop every algorithm runs (its pieces come from `algorithms.Algorithm`).

    for each batch of this client's round:
        loss = algorithm.gradient(r, backward)      # p.grad ← ∇fᵢ (FedSpeed: at a perturbed point)
        algorithm.correct(r)                        # the algorithm's gradient transform
        clip the direction's norm (0 disables)      # FL-Simulator clips every algorithm's to 10
        base optimizer step                         # any optimizer of curvtrain.optim's registry
    upload, new state = algorithm.finish(r)

Pure torch: the actors of `pool` call it, and so do the unit tests, in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from curvtrain.distributed.federated.algorithms import Algorithm, Flat, LocalRound, load_flat, views


class ClientDiverged(FloatingPointError):
    """A client's local training produced a non-finite loss or model."""


@dataclass
class ClientResult:
    upload: Flat
    """What the server averages (at least "delta" = xᵢ,K − xᵗ)."""
    state: Flat
    """The client's new state (empty for stateless algorithms)."""
    loss: float
    """Mean training loss over the local steps."""
    samples: int
    """Training samples the client processed."""


def train_client(
    model: nn.Module,
    algorithm: Algorithm,
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    *,
    start: torch.Tensor,
    server_state: Flat,
    client_state: Flat,
    lr: float,
    steps: int,
    grad_clip: float = 0.0,
) -> ClientResult:
    """Load xᵗ (`start`, a flat vector) into `model`, run the K local steps over `batches`, and return the
    upload and new state. `optimizer` is a fresh base optimizer over model.parameters() (its lr is set here)."""
    params = [p for p in model.parameters() if p.requires_grad]
    load_flat(params, start)
    for group in optimizer.param_groups:
        group["lr"] = lr
    r = LocalRound(
        params=params,
        start=views(start, params),
        client={k: views(client_state[k], params) for k in algorithm.client_state},
        server={k: views(server_state[k], params) for k in algorithm.server_state},
        lr=lr,
        steps=steps,
    )
    model.train()
    loss_sum, samples, done = torch.zeros((), dtype=torch.float64, device=start.device), 0, 0
    for batch in batches:
        def backward() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=False)
            loss = loss_fn(model, batch)
            loss.backward()
            return loss.detach()

        loss_sum += algorithm.gradient(r, backward)
        algorithm.correct(r)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        samples += len(batch[1])
        done += 1
    if done != steps:
        raise ValueError(f"the client's batches gave {done} local steps, expected {steps}")
    upload, state = algorithm.finish(r)
    loss = (loss_sum / steps).item()  # the one host sync of the round
    if not (torch.isfinite(torch.tensor(loss)) and all(torch.isfinite(v).all() for v in upload.values())):
        raise ClientDiverged(f"local training diverged (mean loss {loss})")
    return ClientResult(upload=upload, state=state, loss=loss, samples=samples)
