"""Optimizers and estimators: pure torch on local tensors, no process groups."""
from curvtrain.optim.adamw import AdamW
from curvtrain.optim.gradnorm_lorp import GradNormLoRP
from curvtrain.optim.per_layer import attach_per_layer_step
from curvtrain.optim.registry import OPTIMIZERS, WHOLE_MATRIX, LowRankConfig, OptimizerConfig, build_optimizer
from curvtrain.optim.schedule import ScheduleConfig, warmup_cosine

__all__ = [
    "OPTIMIZERS", "WHOLE_MATRIX", "AdamW", "GradNormLoRP", "LowRankConfig", "OptimizerConfig", "ScheduleConfig",
    "attach_per_layer_step", "build_optimizer", "warmup_cosine",
]
