"""Block ownership: which rank holds the optimizer state of, and updates, each parameter block.

A block is one whole parameter (a 2-D matrix stays whole, so low-rank projections stay possible).
The plan is plain data — {parameter name: rank} — made by a pure function of the blocks' costs, so it
is computed once by the coordinator, shipped to the workers, checked on resume, and unit-tested
without processes.

    ranks:    0            1
    blocks:   mlp.0.up     mlp.0.down    ← largest first, each to the least-loaded rank (LPT)
              attn.0.q     mlp.0.gate
              ...          ...
"""
from __future__ import annotations

import heapq

import torch


def assign_owners(costs: dict[str, int], world_size: int) -> dict[str, int]:
    """Longest-processing-time greedy: blocks by decreasing cost (ties by name) go to the rank with the
    least cost so far (ties to the lowest rank). Max load ≤ 4/3 of the optimum (Graham 1969)."""
    if world_size < 1:
        raise ValueError(f"world_size must be ≥ 1, got {world_size}")
    loads = [(0, rank) for rank in range(world_size)]
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        load, rank = heapq.heappop(loads)
        owners[name] = rank
        heapq.heappush(loads, (load + costs[name], rank))
    return owners


def state_costs(optimizer: torch.optim.Optimizer, names: dict[torch.Tensor, str], *, own_cost: bool) -> dict[str, int]:
    """Cost of each parameter's block by name: the optimizer's `state_numel(p, group)` where its registry
    entry declares one (`Needs.state_cost`), else the parameter's size."""
    return {names[p]: optimizer.state_numel(p, group) if own_cost else p.numel()
            for group in optimizer.param_groups for p in group["params"]}


def plan_for(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int, *, own_cost: bool) -> dict[str, int]:
    """The ownership plan of `optimizer` over `model`'s parameters (works on a meta-device model)."""
    names = {p: n for n, p in model.named_parameters()}
    return assign_owners(state_costs(optimizer, names, own_cost=own_cost), world_size)
