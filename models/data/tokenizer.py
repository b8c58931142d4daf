"""Tokenizers: SentencePiece `.model` files and Hugging Face `tokenizer.json` files (the `tokenizers` library).

A spec is a built-in name, a path to a `.model` file (SentencePiece), or a path to a `tokenizer.json` (or to
a folder holding one: a Hugging Face model folder; its `tokenizer_config.json`, if present, names the BOS and
EOS tokens). `train:N` (models.data.tokens) is a SentencePiece BPE of N tokens trained on the corpus
(`train_sentencepiece`), cached beside the token file. The default, "mistral-v1", is `mistral_common/data/tokenizer.model.v1` from PyPI mistral-common
(Apache-2.0): a 32,000-token LLaMA-format SentencePiece BPE (byte fallback, BOS=1, EOS=2), so it works offline.

`encode` adds no BOS/EOS, the caller places them; `encode_batch` uses every core this process may run on.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece

DEFAULT_TOKENIZER = "mistral-v1"

# Built-in tokenizers: spec -> (package that ships the file, path inside the package).
BUILTIN_TOKENIZERS = {
    "mistral-v1": ("mistral_common", "data/tokenizer.model.v1"),
}

# Where a tokenizer.json comes without a tokenizer_config.json: the usual names of its special tokens
# (LLaMA-1/2 and Mistral, GPT-2 and most BPEs, LLaMA-3, Gemma), first match wins.
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")


TRAIN_PREFIX = "train:"
# Sentences (lines) a trained tokenizer sees at most, sampled from the corpus by SentencePiece: bounds its memory.
TRAIN_SENTENCES = 300_000


def trained_vocab_size(spec: str) -> int | None:
    """N of a `train:N` spec (ValueError if N is not a usable size), None for any other spec."""
    if not spec.startswith(TRAIN_PREFIX):
        return None
    size = spec.removeprefix(TRAIN_PREFIX)
    if not size.isdigit() or int(size) < 320:
        raise ValueError(f"data.tokenizer={spec!r}: train:N needs a vocabulary size N ≥ 320 (256 byte pieces, "
                         f"BOS, EOS, UNK and merges), e.g. train:4096")
    return int(size)


def train_sentencepiece(lines: Iterable[str], vocab_size: int, out: Path) -> Path:
    """A LLaMA-format SentencePiece BPE (byte fallback, digits split, no normalization, UNK=0 BOS=1 EOS=2) of `vocab_size` pieces
    trained on `lines`, written to `out` (a .model file) atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=out.parent))
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(tmp / "m"), vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False,  # LLaMA's: text kept as it is
            character_coverage=0.9995, input_sentence_size=TRAIN_SENTENCES, shuffle_input_sentence=True,
            num_threads=usable_cores(), minloglevel=2)
        os.replace(tmp / "m.model", out)
    except RuntimeError as e:
        raise ValueError(f"training a {vocab_size}-token SentencePiece tokenizer on the corpus failed: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_tokenizer_path(spec: str) -> Path:
    """The file a spec names: a built-in's `.model`, or a path (`~` expanded; a folder means its tokenizer.json)."""
    if spec in BUILTIN_TOKENIZERS:
        package, relpath = BUILTIN_TOKENIZERS[spec]
        try:
            path = Path(str(importlib.resources.files(package) / relpath))
        except ModuleNotFoundError as e:
            raise FileNotFoundError(f"tokenizer {spec!r} needs the package {package!r}: pip install it") from e
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer {spec!r}: no such file {path} (give one of {sorted(BUILTIN_TOKENIZERS)}, a path to a "
            f"SentencePiece .model file, or a Hugging Face tokenizer.json or a folder holding one)"
        )
    return path


class Tokenizer:
    """The interface both kinds share; `Tokenizer.load(spec)` gives the right one."""

    kind: str
    path: Path
    """The tokenizer's file (its hash keys the token cache; export copies it)."""

    @staticmethod
    def load(spec: str = DEFAULT_TOKENIZER) -> Tokenizer:
        path = resolve_tokenizer_path(spec)
        if path.suffix == ".json":
            return HFTokenizer(path, spec)
        return SentencePieceTokenizer(path, spec)

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    """None where the tokenizer has no such token."""

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token(self, token_id: int) -> str:
        """The text of one token id (its piece)."""
        raise NotImplementedError


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), the thread count of batched encoding."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_path: Path, spec: str):
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"tokenizer {spec!r}: {model_path} is not a valid SentencePiece model ({e})") from e
        self.path = model_path
        self.vocab_size = self._sp.vocab_size()
        self.bos_id, self.eos_id = (i if i >= 0 else None for i in (self._sp.bos_id(), self._sp.eos_id()))

    @property
    def processor(self) -> sentencepiece.SentencePieceProcessor:
        return self._sp

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=usable_cores())

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def token(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json; batched encoding runs on all cores in its Rust thread pool."""

    kind = "huggingface"

    def __init__(self, path: Path, spec: str):
        import tokenizers

        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
            raise ValueError(f"tokenizer {spec!r}: {path} is not a valid tokenizer.json ({e})") from e
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = path.parent / "tokenizer_config.json"
        named = json.loads(config.read_text()) if config.is_file() else {}
        self.bos_id = self._special_id(named.get("bos_token"), BOS_NAMES)
        self.eos_id = self._special_id(named.get("eos_token"), EOS_NAMES)

    def _special_id(self, named: str | dict | None, usual: tuple[str, ...]) -> int | None:
        if isinstance(named, dict):
            named = named.get("content")
        for name in (named,) if named else usual:
            if (token_id := self._tok.token_to_id(name)) is not None:
                return token_id
        return None

    @property
    def backend(self):
        """The `tokenizers.Tokenizer`."""
        return self._tok

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)
