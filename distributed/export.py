"""A checkpoint (any ZeRO stage, fp32 or bf16) → one full fp32 state dict → a Hugging Face folder."""
from __future__ import annotations

from pathlib import Path

import torch

from curvtrain.distributed import checkpoint
from curvtrain.distributed.config import TrainConfig


def consolidated_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a sealed checkpoint folder, gathered from ZeRO shards where there are any."""
    ckpt_dir = Path(ckpt_dir)
    manifest = checkpoint.validate(ckpt_dir)
    with checkpoint.weights_only_loading():  # nothing in a checkpoint is unpickled
        if manifest["zero_stage"] == 0 and not any(ckpt_dir.glob("*optim_states.pt")):
            module = torch.load(ckpt_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
            return {k: v.float() for k, v in module.items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)


def export_checkpoint(ckpt_dir: Path, cfg: TrainConfig, out_dir: Path) -> Path:
    """Write model.safetensors + config.json + tokenizer files that `LlamaForCausalLM.from_pretrained` reads."""
    from curvtrain.models.data import load_tokenizer, model_config
    from curvtrain.models.hf import export_hf

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"export target {out_dir} exists and is not empty")
    export_hf(consolidated_state_dict(ckpt_dir), model_config(cfg.model.name, cfg.data, cfg.model.vocab_size),
              out_dir, tokenizer=load_tokenizer(cfg.data))
    return out_dir
