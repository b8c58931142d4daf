"""DeepSpeed engine wiring: our model + an `optim/` optimizer + the schedule → a DeepSpeed engine."""
from __future__ import annotations

import logging

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
        "gradient_clipping": cfg.engine.grad_clip,
        "zero_optimization": zero,
        # Owner-sharded optimizers get a bf16 model instead: DeepSpeed's bf16 optimizer flattens parameters.
        "bf16": {"enabled": cfg.engine.precision == "bf16" and not cfg.owner_sharded},
        # Our optimizers are plain torch.optim.Optimizer subclasses that DeepSpeed wraps as client optimizers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: TrainConfig):
    """deepspeed.initialize around a client optimizer and LR scheduler (stepped at each optimizer step)."""
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
    )
    if cfg.optimizer.per_layer:
        engine.enable_backward_allreduce = False  # each gradient is reduced to its owner inside backward
    return engine
