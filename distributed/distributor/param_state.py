"""Optimizer state by parameter name, in safetensors files that any ownership plan can load.

An owner-distributed rule keeps state only for the parameters its rank owns. Each rank writes those
entries into its own file, keyed by the parameter's name (`<name>/<key>`, nested dicts as
`<name>/<key>/<sub>`), tensors only; everything that is not a tensor (Python numbers, strings, the
param groups' hyperparameters) goes into the file's JSON metadata. State under keys that are not
parameters (M-FAC's GNS γ) is the same on every rank and is written by rank 0 only (`@rule/...`).

Loading reads, from whichever files hold them, the entries of the parameters this rank owns now: a
checkpoint written by N workers resumes on M, whatever the plan (`load`). Nothing is unpickled.
"""
from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from curvtrain.distributed.checkpoint import CheckpointError

RULE = "@rule"
"""The name under which state that belongs to no parameter is stored."""

OBJECTS = {"galore_torch.galore_projector.GaLoreProjector"}
"""Classes stored as their attribute dicts (tensors and plain data), the only objects rebuilt at load:
galore-torch's projector, kept in its optimizer's state."""


def _flatten(value, key: str, tensors: dict[str, Tensor], device: torch.device):
    """`value` as JSON-able data, its tensors moved into `tensors` under `key` (nested keys joined by '/')."""
    if isinstance(value, Tensor):
        tensors[key] = value.detach().contiguous().cpu()
        return {"@tensor": key, "on_param_device": value.device == device}
    if isinstance(value, Mapping):
        return {"@dict": {str(k): _flatten(v, f"{key}/{k}", tensors, device) for k, v in value.items()}}
    if isinstance(value, (tuple, list)):
        return {"@" + type(value).__name__: [_flatten(v, f"{key}/{i}", tensors, device) for i, v in enumerate(value)]}
    cls = f"{type(value).__module__}.{type(value).__qualname__}"
    if cls in OBJECTS:
        return {"@object": cls, "attrs": _flatten(vars(value), key, tensors, device)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"optimizer state {key} is a {cls}, which a checkpoint cannot hold (tensors and plain data only)")


def _unflatten(data, reader, device: torch.device):
    if not isinstance(data, dict):
        return data
    if "@tensor" in data:
        tensor = reader.get_tensor(data["@tensor"])
        return tensor.to(device) if data["on_param_device"] else tensor
    if "@dict" in data:
        return {k: _unflatten(v, reader, device) for k, v in data["@dict"].items()}
    if "@tuple" in data or "@list" in data:
        items = [_unflatten(v, reader, device) for v in data.get("@tuple", data.get("@list"))]
        return tuple(items) if "@tuple" in data else items
    module, _, name = data["@object"].rpartition(".")
    obj = object.__new__(getattr(importlib.import_module(module), name))
    vars(obj).update(_unflatten(data["attrs"], reader, device))
    return obj


def save(rule: torch.optim.Optimizer, names: Mapping[Tensor, str], owned: Sequence[Tensor], path: Path, *,
         with_rule_state: bool) -> None:
    """Write the state of the `owned` parameters of `rule` (and, `with_rule_state`, its state under keys
    that are not parameters, plus the param groups' hyperparameters) to safetensors file `path`."""
    tensors: dict[str, Tensor] = {}
    state = {}
    for p in owned:
        if p in rule.state:
            state[names[p]] = _flatten(rule.state[p], names[p], tensors, p.device)
    if with_rule_state:
        for key, value in rule.state.items():
            if not isinstance(key, Tensor):
                state[f"{RULE}/{key}"] = _flatten(value, f"{RULE}/{key}", tensors, torch.device("cpu"))
    groups = [{k: _flatten(v, f"@group{i}/{k}", tensors, torch.device("cpu")) for k, v in group.items() if k != "params"}
              for i, group in enumerate(rule.param_groups)] if with_rule_state else None
    metadata = {"owned": json.dumps([names[p] for p in owned]), "state": json.dumps(state), "param_groups": json.dumps(groups)}
    save_file(tensors, str(path), metadata=metadata)


def load(rule: torch.optim.Optimizer, names: Mapping[Tensor, str], owned: Iterable[Tensor], paths: list[Path]) -> None:
    """Fill `rule`'s state of the `owned` parameters (and its rule state and hyperparameters) from the files
    `paths` that `save` wrote, whichever plan wrote them; CheckpointError if no file was written by the
    owner of an owned parameter, or the param groups differ."""
    wanted = {names[p]: p for p in owned}
    found_groups, covered = None, set()
    for path in paths:
        with safe_open(str(path), "pt") as reader:
            meta = reader.metadata()
            covered.update(json.loads(meta["owned"]))
            for name, data in json.loads(meta["state"]).items():
                if name.startswith(RULE + "/"):
                    rule.state[name.removeprefix(RULE + "/")] = _unflatten(data, reader, torch.device("cpu"))
                elif name in wanted:
                    p = wanted[name]
                    rule.state[p] = _unflatten(data, reader, p.device)
            groups = json.loads(meta["param_groups"])
            if groups is not None:
                found_groups = [{k: _unflatten(v, reader, torch.device("cpu")) for k, v in g.items()} for g in groups]
    if missing := sorted(set(wanted) - covered):
        raise CheckpointError(f"optimizer state files {[p.name for p in paths]} hold no state of {missing[0]} "
                              f"({len(missing)} parameters missing)")
    if found_groups is None:
        raise CheckpointError(f"optimizer state files {[p.name for p in paths]} hold no param groups (no rank 0 file)")
    if len(found_groups) != len(rule.param_groups):
        raise CheckpointError(f"the checkpoint's optimizer has {len(found_groups)} param groups, this run's {len(rule.param_groups)}")
    for group, loaded in zip(rule.param_groups, found_groups):  # in place: the LR scheduler holds these dicts
        group.update(loaded)
