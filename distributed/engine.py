"""DeepSpeed engine wiring: our model and an `optim/` rule → a distributor around the rule → a DeepSpeed engine."""
from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager

import torch

from curvtrain.distributed.config import TrainConfig
from curvtrain.distributed.distributor import Distributor, distributor_for
from curvtrain.models.data import model_config
from curvtrain.models.llama import LlamaForCausalLM, build_llama
from curvtrain.optim import build_optimizer
from curvtrain.optim.adamw import decay_groups
from curvtrain.optim.int8 import Int8Weight, quantize_weights_


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

    config, dtype = distributor_for(cfg).engine_config(cfg), param_dtype(cfg)
    return lambda module: deepspeed.zero.Init(module=module, config_dict_or_path=config, dtype=dtype)


def build_model_and_optimizer(cfg: TrainConfig, device: torch.device) -> tuple[LlamaForCausalLM, torch.optim.Optimizer]:
    """The model materialized on `device` in the run's dtype, and the registry's optimizer over it.

    The weights are those of `LlamaForCausalLM` built in float32 after the global seed, cast to the run's dtype
    (`build_llama`), but no float32 copy of the model is ever held: bf16 runs hold bf16 weights (owner-distributed
    ones train them as they are, GaLore's recipe; DeepSpeed's bf16 keeps its own fp32 master partitions), and
    under ZeRO-3 each rank keeps only its partition of each parameter from the moment it is drawn. On the meta
    device nothing is drawn (the coordinator plans block ownership there).
    """
    place = zero3_partitioner(cfg) if device.type != "meta" else None
    model = build_llama(model_config(cfg.model.name, cfg.data, cfg.model.vocab_size), dtype=param_dtype(cfg), device=device, place=place)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    if cfg.model.weights == "int8" and device.type != "meta":
        quantize_weights_(model, cfg.optimizer.needs.int8_targets)
    return model, build_optimizer(cfg.optimizer, model.named_parameters())


def build_engine(model: torch.nn.Module, distributor: Distributor, scheduler, cfg: TrainConfig):
    """deepspeed.initialize around the distributor's client optimizer — or none, where DeepSpeed builds its
    own from the config (deepspeed_muon), on the weight-decay groups — and the LR scheduler or a function of
    the optimizer that makes it (stepped at each optimizer step), in the DeepSpeed config the distributor
    asks for."""
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    optimizer = distributor.client_optimizer
    groups = decay_groups(model.parameters(), cfg.optimizer.weight_decay) if optimizer is None else None
    with _int8_weights_not_broadcast(model):
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=groups, lr_scheduler=scheduler,
            config=distributor_for(cfg).engine_config(cfg),
        )
    distributor.attach(engine)
    return engine


@contextmanager
def _int8_weights_not_broadcast(model: torch.nn.Module):
    """DeepSpeed broadcasts the bytes of every parameter from rank 0 at start unless it carries `ds_optim_param`;
    an INT8 weight has no bytes of its own (codes and scales), and every rank built the same ones (same seed,
    rounding to nearest), so it is marked while the engine starts."""
    int8 = [p for p in model.parameters() if isinstance(p, Int8Weight)]
    for p in int8:
        p.ds_optim_param = True
    try:
        yield
    finally:
        for p in int8:
            del p.ds_optim_param
