"""DeepSpeed ZeRO as a distributor: for update rules that work on flat partitions (AdamW, SGD).

DeepSpeed carries all three stages itself: at stage 0 every rank all-reduces the gradients and steps the
whole model (plain data parallelism); at stages 1-3 the optimizer state (1), gradients (2) and weights
(3) are partitioned flat across ranks, gradients reduce-scattered and weights all-gathered.

A checkpoint resumes at any worker count: at stage 0 the model file holds the whole optimizer state; a
stage 1-3 checkpoint written by another number of workers is converted once, before the workers start,
into DeepSpeed's universal checkpoint (`ds_to_universal`: per-parameter fp32 weights and moments), which
each rank loads at the new data-parallel degree (`"checkpoint": {"load_universal": true}`).
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from curvtrain.distributed import checkpoint
from curvtrain.distributed.checkpoint import CheckpointError

from curvtrain.distributed.distributor.base import Distributor


class ZeroDistributor(Distributor):
    name = "zero"

    @classmethod
    def prepare_resume(cls, manifest: dict, ckpt: Path, cfg) -> None:
        if _needs_universal(manifest, cfg.workers.num_workers):
            to_universal(ckpt)

    def __init__(self, cfg, model: torch.nn.Module, rule: torch.optim.Optimizer, owners: None = None):
        self.client_optimizer = rule
        self.num_workers = cfg.workers.num_workers

    def reduce_estimates(self, params: Sequence[Tensor], estimates: Sequence[Tensor], scale: float) -> dict[Tensor, Tensor]:
        raise RuntimeError("a curvature estimate needs whole blocks: its optimizer runs on the owner distributor")

    def save(self, engine, ckpt: Path) -> None:
        # at stage 0 DeepSpeed writes rank 0's (every rank's identical) optimizer state with the model
        engine.save_checkpoint(str(ckpt.parent), tag=ckpt.name, save_latest=False)

    def load(self, engine, ckpt: Path) -> None:
        manifest = checkpoint.read_manifest(ckpt)
        universal = _needs_universal(manifest, self.num_workers)
        source = universal_dir(ckpt) if universal else ckpt
        built = [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in engine.optimizer.param_groups]
        with _loading_universal(engine, universal):
            path, _ = engine.load_checkpoint(str(source.parent), tag=source.name)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {source}")
        if universal and manifest["zero_stage"] == 3:
            # DeepSpeed 0.19's ZeRO-3 universal loader copies group 0's hyperparameters onto every group (the
            # norms' weight_decay=0 became group 0's) and gives every group one shared `step` tensor, which an
            # in-place `step += 1` then advances once per group. The hyperparameters are the config's (fixed
            # on resume): put them back; and give each state its own step.
            for group, hyper in zip(engine.optimizer.param_groups, built):
                group.update(hyper)
            for state in engine.optimizer.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()


def _needs_universal(manifest: dict, num_workers: int) -> bool:
    return manifest["zero_stage"] > 0 and manifest["world_size"] != num_workers


def universal_dir(ckpt: Path) -> Path:
    """Where checkpoint `ckpt`'s universal conversion lives: RUN_DIR/checkpoints/universal/<tag>."""
    return ckpt.parent / "universal" / ckpt.name


def to_universal(ckpt: Path) -> Path:
    """Convert ZeRO checkpoint `ckpt` into DeepSpeed's universal format once (kept for later resumes of
    the same checkpoint; conversions of other checkpoints are removed); returns its folder."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    target = universal_dir(ckpt)
    if target.is_dir():
        return target
    shutil.rmtree(target.parent, ignore_errors=True)  # conversions of older checkpoints
    partial = target.with_name(target.name + ".partial")
    args = Namespace(input_folder=str(ckpt), output_folder=str(partial), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    with checkpoint.weights_only_loading():
        ds_to_universal.main(args)
    partial.rename(target)
    return target


@contextmanager
def _loading_universal(engine, universal: bool):
    """DeepSpeed reads its `checkpoint.load_universal` setting only while loading: set it for this load."""
    saved = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = universal
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = saved
