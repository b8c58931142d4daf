"""Export a `models.llama` state dict as a Hugging Face LLaMA checkpoint folder.

Our parameter names are HF's already, so export is checking shapes and writing files:

    out_dir/
      model.safetensors          the state dict, as is
      config.json                read by transformers.LlamaConfig (4.x and 5.x)
      generation_config.json
      tokenizer.model            a SentencePiece tokenizer's model, as the corpus was encoded with it
      tokenizer.json             a `tokenizers` tokenizer: a Hugging Face tokenizer's own file, copied; for a
                                 SentencePiece model the same tokenizer, built here (see _tokenizer_json)
      tokenizer_config.json, special_tokens_map.json

`transformers.AutoTokenizer.from_pretrained(out_dir)` then encodes text to the ids the tokenizer gives; for
SentencePiece, `[bos] + sp.encode(text)`, leading spaces, digits and byte fallback included; only text spelling a
special token ("<s>") differs, as HF reads it as that token. The files need no transformers to write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import sentencepiece
import torch
from safetensors.torch import save_file

from curvtrain.models.data.tokenizer import SentencePieceTokenizer, Tokenizer
from curvtrain.models.llama import LlamaConfig


def hf_config_dict(cfg: LlamaConfig, *, bos_token_id: int | None, eos_token_id: int, torch_dtype: str = "float32") -> dict:
    """config.json for `transformers.LlamaForCausalLM`: the shapes of `cfg` plus LLaMA's fixed choices."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        # transformers 4.x reads rope_theta/rope_scaling, 5.x reads rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }


def export_hf(state_dict: dict[str, torch.Tensor], cfg: LlamaConfig, out_dir: str | Path, *,
              tokenizer: Tokenizer) -> Path:
    """Write `state_dict` (of `LlamaForCausalLM(cfg)`) and `tokenizer` as an HF checkpoint folder `out_dir`.

    Refuses (ValueError) a state dict whose keys or shapes are not those of `cfg`, a tokenizer larger than the
    vocabulary or without EOS, and (FileExistsError) a non-empty `out_dir`. Files are written into a temporary
    folder beside `out_dir` that is renamed at the end, so a failed export leaves no `out_dir` behind.
    """
    out_dir = Path(out_dir)
    _check_state_dict(state_dict, cfg)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size {cfg.vocab_size}")
    if tokenizer.eos_id is None:
        raise ValueError(f"tokenizer {tokenizer.path} has no EOS token, which generation stops at")
    bos_token_id, eos_token_id = tokenizer.bos_id, tokenizer.eos_id
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the export is for others to read
    try:
        tensors, seen = {}, set()
        for name, t in state_dict.items():
            t = t.detach().cpu().contiguous()
            if t.data_ptr() in seen:  # tied weights share storage, which safetensors refuses
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[name] = t
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        dtype = str(state_dict["model.embed_tokens.weight"].dtype).removeprefix("torch.")
        _write_json(tmp / "config.json", hf_config_dict(cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                                        torch_dtype=dtype))
        _write_json(tmp / "generation_config.json", {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id})
        special = {"bos_token": tokenizer.token(bos_token_id) if bos_token_id is not None else None,
                   "eos_token": tokenizer.token(eos_token_id)}
        if isinstance(tokenizer, SentencePieceTokenizer):
            sp = tokenizer.processor
            shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")
            _write_json(tmp / "tokenizer.json", _tokenizer_json(sp, bos_token_id))
            special["unk_token"] = sp.id_to_piece(sp.unk_id())
        else:  # a tokenizer.json already: its own post-processor decides about BOS
            shutil.copyfile(tokenizer.path, tmp / "tokenizer.json")
        special = {k: v for k, v in special.items() if v is not None}
        _write_json(tmp / "special_tokens_map.json", special)
        _write_json(tmp / "tokenizer_config.json", {
            # Not "LlamaTokenizer": transformers 5 rebuilds that class's pipeline from scratch, dropping
            # tokenizer.json's normalizer (its Metaspace pre-tokenizer adds no "▁" before text that starts with a
            # space, where SentencePiece does); the generic class loads tokenizer.json as written, in 4.x and 5.x.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": isinstance(tokenizer, SentencePieceTokenizer) and bos_token_id is not None,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": cfg.max_position_embeddings,
        })
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_state_dict(state_dict: dict[str, torch.Tensor], cfg: LlamaConfig) -> None:
    """ValueError naming the missing, unexpected and misshapen keys, if any."""
    C, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    expected = {"model.embed_tokens.weight": (cfg.vocab_size, C), "model.norm.weight": (C,),
                "lm_head.weight": (cfg.vocab_size, C)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        expected |= {
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * D, C),
            p + "self_attn.k_proj.weight": (cfg.num_key_value_heads * D, C),
            p + "self_attn.v_proj.weight": (cfg.num_key_value_heads * D, C),
            p + "self_attn.o_proj.weight": (C, cfg.num_attention_heads * D),
            p + "mlp.gate_proj.weight": (I, C), p + "mlp.up_proj.weight": (I, C), p + "mlp.down_proj.weight": (C, I),
            p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
        }
    problems = []
    if missing := sorted(expected.keys() - state_dict.keys()):
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected := sorted(state_dict.keys() - expected.keys()):
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                        f"(a '_orig_mod.' or 'module.' prefix comes from torch.compile or a DDP wrapper)")
    if bad := [f"{k} {tuple(state_dict[k].shape)} != {s}" for k, s in expected.items()
               if k in state_dict and tuple(state_dict[k].shape) != s]:
        problems.append(f"wrong shapes {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    if problems:
        raise ValueError("state dict does not match the LlamaConfig: " + "; ".join(problems))


def _tokenizer_json(sp: sentencepiece.SentencePieceProcessor, bos_token_id: int | None) -> dict:
    """A `tokenizers` BPE equivalent to SentencePiece BPE model `sp`, with `bos_token_id` prepended.

    SentencePiece BPE merges, at each step, the adjacent pair whose union has the highest score; `tokenizers` BPE
    merges the pair ranked first in its merge list. So the merge list holds every split of every piece into two
    pieces, ordered by the piece's score (transformers' converter did so in 4.x; 5.x orders by id, which
    differs for LLaMA/Mistral models whose whitespace-only pieces have low ids but score -1e9). SentencePiece's
    normalisation (no character map, `add_dummy_prefix`, space -> "▁") becomes Prepend + Replace; the
    pre-tokenizer is unset as SentencePiece BPE does not split the text into words.
    """
    specials = [i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)]
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    merges = []
    for i in range(sp.vocab_size()):
        if i in specials or sp.is_byte(i):
            continue
        piece, score = sp.id_to_piece(i), sp.get_score(i)
        merges += [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                   if piece[:k] in vocab and piece[k:] in vocab]
    # Ties (the whitespace runs) go to the longer left part, so runs of spaces merge left to right as in SP.
    merges.sort(key=lambda m: (-m[2], -len(m[0]), -len(m[1]), vocab[m[0]], vocab[m[1]]))
    bos = sp.id_to_piece(bos_token_id) if bos_token_id is not None else None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i in specials],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ]},
        "pre_tokenizer": None,
        "post_processor": None if bos is None else {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_token_id], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {"type": "BPE", "dropout": None, "unk_token": sp.id_to_piece(sp.unk_id()),
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                  "merges": [[left, right] for left, right, _ in merges]},
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
