"""A checkpoint (any ZeRO stage, fp32 or bf16, INT8 weights at ZeRO 0) → one full fp32 state dict → a Hugging Face folder."""
from __future__ import annotations

from pathlib import Path

import torch

from curvtrain.distributed import checkpoint
from curvtrain.distributed.config import TrainConfig
from curvtrain.distributed.health import nonfinite_counts
from curvtrain.optim.int8 import dequantized_state_dict


def consolidated_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a sealed checkpoint folder, gathered from ZeRO shards where there are any."""
    ckpt_dir = Path(ckpt_dir)
    manifest = checkpoint.validate(ckpt_dir)
    with checkpoint.weights_only_loading():  # nothing in a checkpoint is unpickled
        if manifest["zero_stage"] == 0 and not any(ckpt_dir.glob("*optim_states.pt")):
            module = torch.load(ckpt_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
            return {k: v.float() for k, v in dequantized_state_dict(module).items()}  # INT8 weights: codes · scales
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)


def refuse_nonfinite(ckpt_dir: Path, state: dict[str, torch.Tensor]) -> None:
    """CheckpointError naming the tensors whose weights hold NaN or inf (a model nobody can use)."""
    counts = nonfinite_counts(state.values()).tolist()
    bad = [(name, n) for name, n in zip(state, counts) if n]
    if bad:
        names = ", ".join(f"{name} ({n:,} of {state[name].numel():,})" for name, n in bad[:3])
        raise checkpoint.CheckpointError(
            f"checkpoint {ckpt_dir} holds non-finite weights (NaN or inf) in {len(bad)} of {len(state)} tensors, "
            f"e.g. {names}: refused (export a checkpoint from before the run diverged)")


def export_checkpoint(ckpt_dir: Path, cfg: TrainConfig, out_dir: Path) -> Path:
    """Write model.safetensors + config.json + tokenizer files that `LlamaForCausalLM.from_pretrained` reads."""
    from curvtrain.models.data import load_tokenizer, model_config
    from curvtrain.models.hf import export_hf

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"export target {out_dir} exists and is not empty")
    state = consolidated_state_dict(ckpt_dir)
    refuse_nonfinite(ckpt_dir, state)
    export_hf(state, model_config(cfg.model.name, cfg.data, cfg.model.vocab_size), out_dir, tokenizer=load_tokenizer(cfg.data))
    return out_dir
