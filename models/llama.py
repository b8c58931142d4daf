"""LLaMA decoder, in one file, built upward: RMSNorm, rotary embeddings, attention, SwiGLU MLP, block, model.

The architecture is LLaMA's (Touvron et al. 2023, arXiv:2302.13971): pre-norm residual blocks with RMSNorm
(Zhang & Sennrich 2019, arXiv:1910.07467), rotary position embeddings (Su et al. 2021, arXiv:2104.09864),
a SwiGLU MLP (Shazeer 2020, arXiv:2002.05202), optional grouped-query attention (Ainslie et al. 2023,
arXiv:2305.13245), no biases and an untied output head. Parameter names, rotary convention and init follow
Hugging Face's `LlamaForCausalLM`, so a state dict moves between the two unchanged (`models/hf.py` exports one).
The named sizes are GaLore's (Zhao et al. 2024, arXiv:2403.03507), the usual ladder for optimizer comparisons.

    model = LlamaForCausalLM(llama_config("60m"))
    model = build_llama(llama_config("7b"), dtype=torch.bfloat16)   # same weights, no float32 copy ever held
    loss = model(input_ids, targets)           # targets already shifted: targets[:, t] = input_ids[:, t + 1]
    logits = model(input_ids)                  # [B, T, vocab_size]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(kw_only=True)
class LlamaConfig:
    """Shapes and constants of a LLaMA decoder; the field names are Hugging Face's `LlamaConfig`'s."""

    vocab_size: int = 32000
    """Rows of the embedding and the output head; 32000 is the LLaMA-1/2 SentencePiece vocabulary."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP; LLaMA uses about 8/3 * hidden_size, rounded."""
    num_hidden_layers: int
    """Number of decoder blocks."""
    num_attention_heads: int
    """Query heads; head_dim = hidden_size / num_attention_heads."""
    num_key_value_heads: int | None = None
    """Key/value heads, shared by groups of query heads (GQA); None means one per query head (plain MHA)."""
    max_position_embeddings: int = 1024
    """Longest sequence the model is meant for (GaLore trains at 256 and sets 1024); recorded for HF export."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies, inv_freq = 1 / theta^(2i / head_dim)."""
    rms_norm_eps: float = 1e-6
    """Added to the mean square inside RMSNorm; LLaMA-1 and GaLore use 1e-6."""
    initializer_range: float = 0.02
    """Standard deviation of the normal init of every linear and embedding weight (HF's init)."""
    tie_word_embeddings: bool = False
    """Share the output head with the input embedding; LLaMA does not."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads <= 0:
            raise ValueError(f"num_key_value_heads must be positive, got {self.num_key_value_heads}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = hidden_size / num_attention_heads must be even for rotary "
                             f"embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# GaLore's configs/llama_*.json; `tiny` is a debug size that runs in seconds on a CPU.
LLAMA_CONFIGS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256),
    "20m": LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
    "60m": LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "130m": LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "350m": LlamaConfig(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16),
    "1b": LlamaConfig(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24, num_attention_heads=32),
    "7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    # `nano`: a few million parameters, mostly transformer. The share of the embedding and head is
    # 2V / (2V + 12·L·C) (MLP ≈ 8/3 C), ≤ 25% when L·C ≥ V/2: with a small vocabulary (a SentencePiece model
    # trained on the corpus; 4096 here is nominal, the run's vocabulary comes from its tokenizer).
    "nano": LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                        num_attention_heads=4),  # 8.43M, embeddings 24.9%
    "nano-4m": LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=16,
                           num_attention_heads=4),  # 4.26M, embeddings 24.6%
}


def llama_config(name: str, **overrides) -> LlamaConfig:
    """The named config `name` (a key of LLAMA_CONFIGS) with `overrides` applied and validated."""
    if name not in LLAMA_CONFIGS:
        raise ValueError(f"unknown LLaMA config {name!r}; valid names: {', '.join(LLAMA_CONFIGS)}")
    base = LLAMA_CONFIGS[name]
    if "num_attention_heads" in overrides and base.num_key_value_heads == base.num_attention_heads:
        overrides.setdefault("num_key_value_heads", None)  # a multi-head config stays multi-head
    return dataclasses.replace(base, **overrides)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back (Zhang & Sennrich 2019), as HF's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [seq_len, head_dim] of RoPE (Su et al. 2021) in HF's non-interleaved layout.

    Dimensions i and i + head_dim/2 rotate together at frequency theta^(-2i/head_dim). The tables are recomputed
    in float32 at every forward (a few thousand flops) rather than cached in buffers, which
    `model.to(torch.bfloat16)` would round and a meta-device build followed by `to_empty()` would leave garbage.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq  # a mul: autocast keeps fp32
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, head_dim] by position; cos/sin are cast to x's dtype first, as HF does."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings and optional grouped-query attention (Ainslie et al. 2023)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # enable_gqa lets each kv head serve its group of query heads without materialising repeated copies;
        # it is only set when needed so that plain MHA may use every SDPA backend.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss: mean cross-entropy of logits [B, T, V] against targets [B, T] (already shifted,
    -100 ignored), in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


class LlamaForCausalLM(nn.Module):
    """Embedding, decoder blocks, final norm and output head; `state_dict()` keys are HF LlamaForCausalLM's."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        # Set True to recompute each block in the backward pass instead of storing its activations (training only).
        self.gradient_checkpointing = False
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    INITIALIZED = (nn.Linear, nn.Embedding)
    """The modules `_init_weights` draws; the others keep what their own `reset_parameters` gives."""

    def _init_weights(self, module: nn.Module) -> None:
        """HF's init: normal(0, initializer_range) for linears and embeddings; norms keep their ones."""
        if isinstance(module, self.INITIALIZED):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab_size] for input_ids [B, T]; with targets [B, T] (already shifted, -100 ignored)
        the mean cross-entropy over all counted positions instead, computed in float32."""
        cos, sin = rotary_cos_sin(input_ids.shape[1], self.config.head_dim, self.config.rope_theta, input_ids.device)
        x = self.model.embed_tokens(input_ids)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))
        return logits if targets is None else causal_lm_loss(logits, targets)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters; exclude_embeddings leaves out the input embedding table (a lookup, not a matmul)
        unless it is tied to the output head, whose matmul it then is."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.config.tie_word_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) flops per token: 6 * N + 12 * n_layers * hidden_size * seq_len.

        N is num_parameters(exclude_embeddings=True) (every matmul weight, lm_head included): 2 flops per weight
        forward and 4 backward. The second term is attention's QK^T and AV over the full (unmasked) context
        (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's estimate_mfu).
        """
        attention = 12.0 * self.config.num_hidden_layers * self.config.hidden_size * seq_len
        return 6.0 * self.num_parameters(exclude_embeddings=True) + attention


def build_llama(cfg: LlamaConfig, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                place: Callable[[nn.Module], None] | None = None) -> LlamaForCausalLM:
    """`LlamaForCausalLM(cfg).to(device, dtype)` after the same global RNG state — the same weights, bit for bit
    in float32, and their cast in `dtype` — without ever holding the model in float32.

    The model is built on the meta device; then the global CPU generator is advanced exactly as the eager
    constructor advances it: first every module's own default init (nn.Linear's kaiming-uniform,
    nn.Embedding's normal), drawn and thrown away in construction order, then `_init_weights` module by
    module in `nn.Module.apply`'s order. Each module's parameters are drawn in float32 into one CPU scratch
    buffer the size of the largest module and cast into their final storage on `device`, so the peak is the
    model in `dtype` plus that buffer (0.49 GiB at 7b). `place(module)`, if given, runs on each module as soon
    as its own parameters are final (ZeRO-3 partitions them there). On the meta device nothing is drawn.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    if torch.device(device).type == "meta":
        return model
    if cfg.tie_word_embeddings and place is not None:
        raise ValueError("build_llama: tie_word_embeddings with a place hook would draw into a placed parameter")
    leaves = [m for m in model.modules() if _has_own_parameters(m)]
    scratch = torch.empty(max(sum(p.numel() for p in m.parameters(recurse=False)) for m in leaves))
    for module in leaves:  # the constructors' own draws, discarded
        with _parameters_in(module, scratch):
            module.reset_parameters()
    final: dict[nn.Parameter, nn.Parameter] = {}  # meta parameter -> its materialized one (tied weights: one)
    for module in _apply_order(model):
        if not _has_own_parameters(module):
            continue
        with _parameters_in(module, scratch) as views:
            if isinstance(module, model.INITIALIZED):
                model._init_weights(module)
            else:
                module.reset_parameters()
        for name, meta in list(module.named_parameters(recurse=False)):
            if meta in final:  # a tied weight drawn again: the last draw wins, as in the eager constructor
                final[meta].data.copy_(views[name])
            else:
                final[meta] = nn.Parameter(views[name].to(device, dtype, copy=True), requires_grad=meta.requires_grad)
            module._parameters[name] = final[meta]
        if place is not None:
            place(module)
    return model


@contextmanager
def _parameters_in(module: nn.Module, scratch: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
    """Points `module`'s own parameters at consecutive float32 views of `scratch` while inside; yields the views."""
    saved, views, offset = dict(module._parameters), {}, 0
    for name, p in module.named_parameters(recurse=False):
        views[name] = scratch[offset:offset + p.numel()].view(p.shape)
        module._parameters[name] = nn.Parameter(views[name], requires_grad=False)
        offset += p.numel()
    try:
        yield views
    finally:
        module._parameters.update(saved)


def _has_own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _apply_order(module: nn.Module) -> Iterator[nn.Module]:
    """The modules in the order `module.apply(fn)` visits them: children first, then the module itself."""
    for child in module.children():
        yield from _apply_order(child)
    yield module


@torch.no_grad()
def generate(model: LlamaForCausalLM, ids: list[int], max_new_tokens: int, *, top_k: int = 0, temperature: float = 1.0,
             stop_id: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """Continues the token ids `ids` by up to `max_new_tokens` tokens (fewer if `stop_id` comes): greedy with
    top_k = 0, else sampled from the `top_k` most likely tokens at `temperature`. No KV cache: each token
    runs the whole (cropped) context again, which is plenty for samples of tiny models."""
    if not ids:
        raise ValueError("generate needs at least one token of context")
    if max_new_tokens < 0 or top_k < 0 or not temperature > 0:
        raise ValueError(f"need max_new_tokens ≥ 0, top_k ≥ 0, temperature > 0; got {max_new_tokens}, {top_k}, {temperature}")
    device = next(model.parameters()).device
    out = list(ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([out[-model.config.max_position_embeddings:]], device=device)
        logits = model(context)[0, -1].float()
        if top_k == 0:
            token = int(logits.argmax())
        else:
            values, indices = logits.topk(min(top_k, logits.numel()))
            choice = torch.multinomial((values / temperature).softmax(-1), 1, generator=generator)
            token = int(indices[choice])
        out.append(token)
        if token == stop_id:
            break
    return out[len(ids):]
