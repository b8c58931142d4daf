"""Muon: orthogonalized momentum for the hidden matrices (Jordan et al. 2024, "Muon: An optimizer for
hidden layers in neural networks"; Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv 2502.16982),
AdamW for everything else (embeddings, output head, norm gains), in one optimizer.

For a hidden 2-D weight W with gradient G, torch.optim.Muon's update (torch ≥ 2.9), run here by torch's
own functional `muon`:

    B ← μB + (1 − μ)G,   B̃ = G + μ(B − G) (Nesterov) or B,   O = NewtonSchulz5(B̃ / ‖B̃‖_F)  (bf16),
    W ← (1 − lr·wd) W − lr·s·O,   s = max(1, rows/cols)^½ ("original") or 0.2·√max(rows, cols)
                                      ("match_rms_adamw": AdamW's lr and wd carry over)

Newton–Schulz needs the whole matrix, so across workers Muon runs owner-sharded (whole matrices on
their owners, distributed.sharded). Groups with `muon=True` get this update; the others get
`adamw.AdamW` (the base class). The momentum buffer is float32 (float64 for float64 weights) whatever
the weight's dtype; the update is computed in that dtype and written into bf16 weights with
stochastic rounding (`rounding.write_weight_`), so no fp32 master copy is kept and small updates
survive. For float32 weights the update is torch.optim.Muon's exactly (tested).
"""
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.nn import Parameter
from torch.optim._muon import muon as muon_update  # torch.optim.Muon's functional form

from .adamw import AdamW, target_groups
from .rounding import write_weight_
from .state import state_dtype

ADJUST_LR_FNS = ("original", "match_rms_adamw")

# Options of a Muon group (torch.optim.Muon's defaults; its `eps` floors the norm before Newton–Schulz).
MUON_DEFAULTS = dict(momentum=0.95, nesterov=True, ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=5,
                     adjust_lr_fn="original")


def _check_muon_group(group: dict) -> None:
    if not 0 <= group["momentum"] < 1:
        raise ValueError(f"momentum must be in [0, 1), got {group['momentum']!r}")
    if not isinstance(group["ns_steps"], int) or not 1 <= group["ns_steps"] < 100:
        raise ValueError(f"ns_steps must be an int in [1, 100), got {group['ns_steps']!r}")
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}")
    if len(group["ns_coefficients"]) != 3:
        raise ValueError(f"ns_coefficients must be three numbers, got {group['ns_coefficients']!r}")
    for p in group["params"]:
        if p.dim() != 2:
            raise ValueError(f"a Muon group needs 2-D parameters, got one of shape {tuple(p.shape)}")


class Muon(AdamW):
    """Muon on groups with `muon=True` (module docstring), `AdamW` on the others.

    A Muon group may set `momentum`, `nesterov`, `ns_coefficients`, `eps`, `ns_steps` and `adjust_lr_fn`
    ("original" or "match_rms_adamw"); see MUON_DEFAULTS. `step_param` steps one parameter (per-layer
    updates, `per_layer`).
    """

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("muon"):
            param_group = {**MUON_DEFAULTS, **param_group}
        super().add_param_group(param_group)
        if param_group.get("muon"):
            _check_muon_group(self.param_groups[-1])

    def state_numel(self, p: Tensor, group: dict) -> int:
        """Elements of state `step_param` creates for p: the cost model of block ownership."""
        return p.numel() if group.get("muon") else super().state_numel(p, group)

    def _init_state(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        if not group.get("muon"):
            return super()._init_state(p, group)
        return {"step": torch.tensor(0, dtype=torch.int64),
                "momentum_buffer": torch.zeros(p.shape, dtype=state_dtype(p), device=p.device)}

    def _update(self, p: Tensor, group: dict, state: dict) -> None:
        if not group.get("muon"):
            return super()._update(p, group, state)
        buf = state["momentum_buffer"]
        w = p.to(buf.dtype)  # p itself for float32/float64 weights
        muon_update([w], [p.grad.to(buf.dtype)], [buf], lr=group["lr"], weight_decay=group["weight_decay"],
                    momentum=group["momentum"], nesterov=group["nesterov"], ns_coefficients=group["ns_coefficients"],
                    eps=group["eps"], ns_steps=group["ns_steps"], adjust_lr_fn=group["adjust_lr_fn"], has_complex=False)
        write_weight_(p, w)  # stochastic rounding into bf16 weights


def muon_param_groups(named_params: Iterable[tuple[str, Parameter]], *, targets: str, weight_decay: float = 0.0,
                      **options) -> list[dict]:
    """Param groups: the trainable parameters whose name matches the regex `targets` (re.search; must be
    2-D) as one Muon group with `options` (MUON_DEFAULTS, and `lr` for its own rate), then all others
    for AdamW split by the weight-decay rule (`adamw.target_groups`)."""
    return target_groups(named_params, targets, "Muon", weight_decay, muon=True, **options)
