"""Text from a trained model: `curvtrain sample`. Loads an exported Hugging Face folder (`curvtrain
export`) or a run's checkpoint (its last one, or the one named) with its tokenizer, and continues a
prompt greedily or by top-k sampling (`models.llama.generate`)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from curvtrain.distributed.config import TrainConfig
from curvtrain.distributed.export import consolidated_state_dict
from curvtrain.models.data import load_tokenizer, model_config
from curvtrain.models.data.tokenizer import Tokenizer
from curvtrain.models.llama import LlamaConfig, LlamaForCausalLM, generate


def is_exported(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def load_exported(folder: Path) -> tuple[LlamaForCausalLM, Tokenizer]:
    """The model and tokenizer of an exported folder (config.json holds our LlamaConfig's fields by name)."""
    from safetensors.torch import load_file

    hf = json.loads((folder / "config.json").read_text())
    cfg = LlamaConfig(**{f.name: hf[f.name] for f in dataclasses.fields(LlamaConfig) if f.name in hf})
    sentencepiece = folder / "tokenizer.model"  # else the folder's tokenizer.json
    tokenizer = Tokenizer.load(str(sentencepiece if sentencepiece.is_file() else folder))
    return _model(cfg, load_file(folder / "model.safetensors")), tokenizer


def load_checkpoint(ckpt: Path, cfg: TrainConfig) -> tuple[LlamaForCausalLM, Tokenizer]:
    """The model and tokenizer of a sealed checkpoint of a run with config `cfg` (full fp32 weights)."""
    model_cfg = model_config(cfg.model.name, cfg.data, cfg.model.vocab_size)
    return _model(model_cfg, consolidated_state_dict(ckpt)), load_tokenizer(cfg.data)


def _model(cfg: LlamaConfig, state_dict: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, assign=True)
    return model.eval()


def sample(model: LlamaForCausalLM, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int, top_k: int = 0,
           temperature: float = 1.0, seed: int = 0) -> str:
    """The prompt's continuation. Training documents follow an EOS (data.py puts one after each document),
    so the context starts with one, and an EOS ends the sample."""
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    out = generate(model, ids, max_new_tokens, top_k=top_k, temperature=temperature, stop_id=tokenizer.eos_id,
                   generator=torch.Generator().manual_seed(seed))
    return tokenizer.decode([t for t in out if t != tokenizer.eos_id])
