"""models/llama.py: config validation, named sizes, causality, GQA, loss, checkpointing, dtypes, compile."""

import math

import pytest
import torch
import torch.nn.functional as F

from curvtrain.models.llama import (LLAMA_CONFIGS, LlamaConfig, LlamaForCausalLM, apply_rotary, build_llama, llama_config,
                                   rotary_cos_sin)


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config("tiny", **overrides))


def random_ids(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --- config -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (dict(hidden_size=0), "hidden_size"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(hidden_size=66), "num_attention_heads"),        # 66 not divisible by 4 heads
    (dict(hidden_size=72, num_attention_heads=8), "head_dim"),  # head_dim 9 is odd
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
])
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        llama_config("tiny", **overrides)


def test_config_defaults_and_lookup():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 16 and cfg.vocab_size == 32000
    # overriding the heads of a multi-head config keeps it multi-head
    assert llama_config("20m", num_attention_heads=8).num_key_value_heads == 8
    assert llama_config("tiny").num_key_value_heads == 2
    with pytest.raises(ValueError, match="tiny.*60m.*7b"):
        llama_config("3b")
    with pytest.raises(TypeError):
        LlamaConfig(64, 128, 1, 4)  # keyword-only


def expected_num_params(cfg: LlamaConfig) -> int:
    C, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    attn = 2 * C * C + 2 * C * cfg.num_key_value_heads * cfg.head_dim
    return 2 * V * C + L * (attn + 3 * C * I + 2 * C) + C


@pytest.mark.parametrize("name", list(LLAMA_CONFIGS))
def test_named_config_parameter_counts(name):
    cfg = LLAMA_CONFIGS[name]
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    n = model.num_parameters()
    assert n == expected_num_params(cfg)
    assert model.num_parameters(exclude_embeddings=True) == n - cfg.vocab_size * cfg.hidden_size
    plausible = {"nano": 8.43e6, "nano-4m": 4.264e6, "20m": 19.55e6, "60m": 58.07e6, "130m": 134.1e6, "350m": 367.9e6, "1b": 1.339e9, "7b": 6.738e9}
    if name in plausible:
        assert n == pytest.approx(plausible[name], rel=2e-3)


@pytest.mark.parametrize("name", ["nano", "nano-4m"])
def test_nano_recipes_are_mostly_transformer(name):
    """A few million parameters, the embedding and the output head together ≤ 25% of them (at the nominal
    4096-token vocabulary), unlike 20m's 84% at 32000 tokens."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LLAMA_CONFIGS[name])
    cfg, n = model.config, model.num_parameters()
    assert cfg.vocab_size == 4096 and 3e6 < n < 10e6
    embeddings = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    assert embeddings == 2 * cfg.vocab_size * cfg.hidden_size
    assert embeddings / n <= 0.25, embeddings / n


def test_flops_per_token():
    with torch.device("meta"):
        model = LlamaForCausalLM(LLAMA_CONFIGS["7b"])
    n = model.num_parameters(exclude_embeddings=True)
    assert model.flops_per_token(2048) == 6 * n + 12 * 32 * 4096 * 2048
    assert model.flops_per_token(2048) == pytest.approx(6 * 6.6e9 + 3.2e9, rel=0.02)


def test_state_dict_keys_are_hf_names():
    model = tiny_model()
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        keys |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        keys |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        keys |= {f"model.layers.{i}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")}
    assert set(model.state_dict()) == keys
    assert model.state_dict()["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)


# --- building without a float32 copy ------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=True)])
def test_build_llama_equals_the_eager_constructor(overrides):
    """Same seed → the eager float32 model bit for bit, and its bf16 cast exactly; the RNG ends where the eager
    constructor leaves it (so whatever is drawn next is unchanged too)."""
    cfg = llama_config("tiny", **overrides)
    torch.manual_seed(7)
    eager = LlamaForCausalLM(cfg)
    after_eager = torch.rand(4)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(7)
        built = build_llama(cfg, dtype=dtype)
        assert torch.equal(torch.rand(4), after_eager)
        expected = eager.to(dtype).state_dict()
        got = built.state_dict()
        assert list(got) == list(expected)
        for name, value in got.items():
            assert value.dtype == dtype and value.device.type == "cpu", name
            assert torch.equal(value, expected[name]), name
        assert (built.lm_head.weight is built.model.embed_tokens.weight) == cfg.tie_word_embeddings
        assert all(p.requires_grad for p in built.parameters())


def test_build_llama_places_each_module_once_final_and_draws_nothing_on_meta():
    placed = []
    torch.manual_seed(0)
    model = build_llama(llama_config("tiny"), place=lambda m: placed.append((m, [p.clone() for p in m.parameters(recurse=False)])))
    leaves = [m for m in model.modules() if list(m.parameters(recurse=False))]
    assert sorted(map(id, leaves)) == sorted(id(m) for m, _ in placed)
    for module, values in placed:  # what the hook saw is what the model holds
        assert all(torch.equal(v, p) for v, p in zip(values, module.parameters(recurse=False)))
    state = torch.get_rng_state()
    meta = build_llama(llama_config("7b"), dtype=torch.bfloat16, device="meta")
    assert meta.lm_head.weight.is_meta and torch.equal(torch.get_rng_state(), state)


def test_tied_embeddings():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == expected_num_params(model.config) - 32000 * 64
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters()


# --- forward ------------------------------------------------------------------------------------------------

def test_causality():
    model = tiny_model().eval()
    ids = random_ids()
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 32000
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (2, 16, 32000)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def reference_attention(attn, x, cos, sin):
    """Attention written out: kv heads repeated explicitly, softmax with an explicit causal mask."""
    B, T, C = x.shape
    H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = apply_rotary(attn.q_proj(x).view(B, T, H, D).transpose(1, 2), cos, sin)
    k = apply_rotary(attn.k_proj(x).view(B, T, KV, D).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(B, T, KV, D).transpose(1, 2)
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_attention_matches_explicit_kv_repeat(kv_heads):
    model = tiny_model(num_key_value_heads=kv_heads)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 12, 64)
    cos, sin = rotary_cos_sin(12, 16, 10000.0, x.device)
    torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, cos, sin), atol=1e-5, rtol=1e-5)


def test_rotary_frequencies():
    cos, sin = rotary_cos_sin(5, 8, 10000.0, torch.device("cpu"))
    inv_freq = torch.tensor([1.0, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75])
    angles = torch.arange(5.0)[:, None] * inv_freq
    torch.testing.assert_close(cos, torch.cat([angles, angles], -1).cos())
    torch.testing.assert_close(sin, torch.cat([angles, angles], -1).sin())


def test_loss_is_cross_entropy_of_logits():
    model = tiny_model()
    ids, targets = random_ids(), random_ids(seed=2)
    targets[0, :5] = -100
    loss = model(ids, targets)
    logits = model(ids)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 32000), targets.view(-1), ignore_index=-100))
    assert loss.item() == pytest.approx(math.log(32000), rel=0.01)  # small init: near-uniform predictions


def test_gradient_checkpointing_gives_same_loss_and_grads():
    ids, targets = random_ids(), random_ids(seed=2)
    results = []
    for enabled in (False, True):
        model = tiny_model()
        model.gradient_checkpointing = enabled
        loss = model(ids, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss0, loss1, rtol=0, atol=0)
    for name in grads0:
        torch.testing.assert_close(grads0[name], grads1[name])


def test_bf16_params_and_autocast():
    ids, targets = random_ids(), random_ids(seed=2)
    model = tiny_model()
    loss32 = model(ids, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_autocast = model(ids, targets)
    loss_autocast.backward()
    assert loss_autocast.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in model.parameters())
    model.to(torch.bfloat16)
    assert model(ids).dtype == torch.bfloat16
    loss_bf16 = model(ids, targets)
    loss_bf16.backward()
    assert loss_bf16.dtype == torch.float32
    for loss in (loss_autocast, loss_bf16):
        assert loss.item() == pytest.approx(loss32.item(), abs=0.02)


def test_compiles_without_graph_breaks():
    model = tiny_model()
    ids, targets = random_ids(), random_ids(seed=2)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(ids, targets)
    loss.backward()
    torch.testing.assert_close(loss, model(ids, targets))
