"""Optimizers and estimators: pure torch on local tensors, no process groups."""
from curvtrain.optim.adahessian import AdaHessian
from curvtrain.optim.adamw import AdamW
from curvtrain.optim.gradnorm_lorp import GradNormLoRP
from curvtrain.optim.mfac import MFAC
from curvtrain.optim.per_layer import attach_per_layer_step
from curvtrain.optim.registry import OPTIMIZERS, LowRankConfig, Needs, OptimizerConfig, build_optimizer
from curvtrain.optim.schedule import ScheduleConfig, warmup_cosine
from curvtrain.optim.sophia import Sophia

__all__ = [
    "MFAC", "OPTIMIZERS", "AdaHessian", "AdamW", "GradNormLoRP", "LowRankConfig", "Needs", "OptimizerConfig",
    "ScheduleConfig", "Sophia", "attach_per_layer_step", "build_optimizer", "warmup_cosine",
]
