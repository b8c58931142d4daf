"""The tokenizer: a SentencePiece model, named by a built-in spec or given as a path to a `.model` file.

The default, "mistral-v1", is `mistral_common/data/tokenizer.model.v1` from PyPI mistral-common (Apache-2.0):
a 32,000-token LLaMA-format SentencePiece BPE (byte fallback, BOS=1, EOS=2), so it works offline.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Sequence

import sentencepiece

DEFAULT_TOKENIZER = "mistral-v1"

# Built-in tokenizers: spec -> (package that ships the file, path inside the package).
BUILTIN_TOKENIZERS = {
    "mistral-v1": ("mistral_common", "data/tokenizer.model.v1"),
}


def resolve_tokenizer_path(spec: str) -> Path:
    """The `.model` file a spec names: a built-in name or a filesystem path (`~` expanded)."""
    if spec in BUILTIN_TOKENIZERS:
        package, relpath = BUILTIN_TOKENIZERS[spec]
        try:
            path = Path(str(importlib.resources.files(package) / relpath))
        except ModuleNotFoundError as e:
            raise FileNotFoundError(f"tokenizer {spec!r} needs the package {package!r}: pip install it") from e
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer {spec!r}: no such file {path} "
            f"(give one of {sorted(BUILTIN_TOKENIZERS)} or a path to a SentencePiece .model file)"
        )
    return path


class Tokenizer:
    """A loaded SentencePiece model; `encode` adds no BOS/EOS, the caller places them."""

    def __init__(self, model_path: Path, spec: str):
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"tokenizer {spec!r}: {model_path} is not a valid SentencePiece model ({e})") from e
        self._model_path = model_path

    @classmethod
    def load(cls, spec: str = DEFAULT_TOKENIZER) -> Tokenizer:
        return cls(resolve_tokenizer_path(spec), spec)

    @property
    def model_path(self) -> Path:
        """The `.model` file, so an exporter can copy it next to the weights."""
        return self._model_path

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts at once, in parallel across `num_threads` (-1: all cores)."""
        return self._sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))
