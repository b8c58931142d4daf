"""Optimizers and estimators: pure torch on local tensors, no process groups."""
from optim.registry import OPTIMIZERS, LowRankConfig, OptimizerConfig, build_optimizer
from optim.schedule import ScheduleConfig, warmup_cosine

__all__ = ["OPTIMIZERS", "LowRankConfig", "OptimizerConfig", "ScheduleConfig", "build_optimizer", "warmup_cosine"]
