"""DeepSpeed engine wiring: our model + an `optim/` optimizer + the schedule → a DeepSpeed engine."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from curvtrain.distributed.config import TrainConfig


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON config for this run (batch geometry, ZeRO stage, precision, clipping)."""
    zero: dict = {"stage": cfg.engine.zero_stage}
    if cfg.engine.zero_stage == 3:
        # Partition every parameter, norms included: the same layout at every model size.
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": cfg.batch.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        # Owner-sharded: each gradient reaches only its owner, and the owners clip by the global norm.
        "gradient_clipping": 0.0 if cfg.owner_sharded else cfg.engine.grad_clip,
        "zero_optimization": zero,
        # Owner-sharded optimizers get a bf16 model instead: DeepSpeed's bf16 optimizer flattens parameters.
        "bf16": {"enabled": cfg.engine.precision == "bf16" and not cfg.owner_sharded},
        # Our optimizers are plain torch.optim.Optimizer subclasses that DeepSpeed wraps as client optimizers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the model's weights are built in: DeepSpeed would cast a float32 model to bf16 anyway before it
    builds its optimizer (and its fp32 master partitions from those bf16 weights)."""
    return torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32


def zero3_partitioner(cfg: TrainConfig) -> Callable[[torch.nn.Module], None] | None:
    """Under ZeRO-3: a `place` hook for `models.llama.build_llama` that hands each module to
    `deepspeed.zero.Init(module=...)` as soon as its parameters are drawn, so a rank never holds more than its
    partition of the model plus one module; None at ZeRO 0-2."""
    if cfg.engine.zero_stage != 3:
        return None
    import deepspeed

    config, dtype = deepspeed_config(cfg), param_dtype(cfg)
    return lambda module: deepspeed.zero.Init(module=module, config_dict_or_path=config, dtype=dtype)


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: TrainConfig):
    """deepspeed.initialize around a client optimizer and LR scheduler (stepped at each optimizer step)."""
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
    )
    if cfg.owner_sharded:
        engine.enable_backward_allreduce = False  # each gradient is reduced to its owner only (distributed.sharded)
    return engine
