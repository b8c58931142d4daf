"""models/hf.py: an exported tiny model and tokenizer load in transformers and agree with ours."""

import json

import pytest
import sentencepiece
import torch

from curvtrain.models.data.tokenizer import Tokenizer
from curvtrain.models.hf import export_hf
from curvtrain.models.llama import LlamaForCausalLM, llama_config

transformers = pytest.importorskip("transformers")

TOKENIZER = Tokenizer.load("mistral-v1")

SENTENCES = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, and  a double space",
    " one leading space",
    "Numbers: 12345, 3.14159 and -0.5e10; dates like 2024-06-01.",
    "Unicode: café, naïve, Ünïcödé, 日本語, Ελληνικά, 🤗 (byte fallback).",
    "def f(x):\n    return x ** 2\t# tab\n\n",
    "trailing space ",
    "",
]


def tiny_model(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config("tiny", **overrides)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model()
    out = export_hf(model.state_dict(), model.config, tmp_path_factory.mktemp("export") / "hf",
                    tokenizer=TOKENIZER)
    return model, out


def test_export_writes_hf_folder(exported):
    model, out = exported
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors", "config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json"}
    assert [p.name for p in out.parent.iterdir()] == ["hf"]  # no temporary folder left
    config = transformers.AutoConfig.from_pretrained(out)
    assert isinstance(config, transformers.LlamaConfig)
    assert (config.hidden_size, config.num_key_value_heads, config.head_dim) == (64, 2, 16)
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


def test_hf_model_gives_our_logits(exported):
    model, out = exported
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, 32000, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff <= 1e-4


def test_our_state_dict_loads_strictly_into_hf():
    model = tiny_model()
    cfg = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps))
    hf.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(0, 32000, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_tokenizer_matches_sentencepiece(exported):
    _, out = exported
    tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER.path))
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    for text in SENTENCES:
        ids = tok(text)["input_ids"]
        assert ids == [1] + sp.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]), text


def test_tied_embeddings_export(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    out = export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer=TOKENIZER)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 32000, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("corrupt, message", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "missing keys.*layers.1.mlp.up_proj"),
    (lambda sd: sd.update(extra=torch.zeros(1)), "unexpected keys.*extra"),
    (lambda sd: sd.update({"lm_head.weight": torch.zeros(31999, 64)}), r"wrong shapes.*lm_head.weight \(31999, 64\)"),
])
def test_export_refuses_mismatched_state_dict(tmp_path, corrupt, message):
    model = tiny_model()
    state_dict = model.state_dict()
    corrupt(state_dict)
    with pytest.raises(ValueError, match=message):
        export_hf(state_dict, model.config, tmp_path / "hf", tokenizer=TOKENIZER)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_config_mismatch_and_nonempty_dir(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="num_key_value_heads|k_proj"):
        export_hf(model.state_dict(), llama_config("tiny", num_key_value_heads=4), tmp_path / "hf",
                  tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="vocab_size"):
        small = tiny_model(vocab_size=1000)
        export_hf(small.state_dict(), small.config, tmp_path / "hf", tokenizer=TOKENIZER)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer=TOKENIZER)
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("curvtrain.models.hf._tokenizer_json", fail)  # fails after model.safetensors is written
    model = tiny_model()
    with pytest.raises(RuntimeError, match="disk full"):
        export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer=TOKENIZER)
    assert list(tmp_path.iterdir()) == []


def test_a_hugging_face_tokenizer_exports_and_generates(tmp_path):
    """A tokenizer.json (a byte-level BPE trained here, GPT-2's recipe) is exported as it is: transformers'
    AutoTokenizer loads it and encodes as `tokenizers` does, and the exported model generates."""
    from test_data import train_bpe

    tok = Tokenizer.load(str(train_bpe(tmp_path / "tok", vocab_size=300)))
    model = tiny_model(vocab_size=tok.vocab_size)
    out = export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer=tok)
    assert not (out / "tokenizer.model").exists()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in SENTENCES:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
    assert hf_tok.eos_token_id == tok.eos_id
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = hf_tok("The quick brown fox", return_tensors="pt")["input_ids"]
    generated = hf_model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_id)
    assert generated.shape[1] > ids.shape[1] and hf_model.config.vocab_size == tok.vocab_size


def test_a_tokenizer_trained_on_the_corpus_exports(tmp_path):
    """data.tokenizer=train:N: the SentencePiece model trained on the corpus exports as the built-in one does."""
    from curvtrain.models.data import DataConfig, load_tokenizer

    tok = load_tokenizer(DataConfig(corpus="lee", tokenizer="train:1000", cache_dir=str(tmp_path / "cache")))
    model = tiny_model(vocab_size=1000)
    out = export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in SENTENCES:
        assert hf_tok(text)["input_ids"] == [tok.bos_id] + tok.encode(text), text
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = hf_tok("The quick brown fox", return_tensors="pt")["input_ids"]
    assert hf_model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
