"""Training data: a corpus tokenized once into a cached token file, and a deterministic sampling rule.

The token file `<cache_dir>/<key>/tokens.bin` holds uint16 tokens (uint32 where the vocabulary exceeds
65,536; meta.json's "dtype" says which), every document followed by EOS (no BOS: EOS alone separates
documents), beside `meta.json`; key = hash(format version, corpus fingerprint, how the files are read,
tokenizer file sha256), so a changed corpus or tokenizer gets a fresh file. The corpus is read and encoded in
pieces of bounded size (`readers.PIECE_CHARS` characters, batches of ENCODE_BATCH_CHARS) and written as it
comes, so memory stays bounded whatever the corpus size; a document longer than one piece is encoded piece
by piece, cut at line boundaries.

The stream of N tokens is split into a training region and, from its END, a validation region of
floor(N * val_fraction) tokens; they share no token. Each region is cut into chunks of seq_len + 1 tokens
with stride seq_len (L = seq_len):

    tokens  |<------------------ train ------------------>|<-------- val -------->|
    chunks  [0: t0..tL] [1: tL..t2L] [2: t2L..t3L] ...     [0] [1] [2] ...
    chunk i: inputs = tokens[i*L : i*L+L], targets = tokens[i*L+1 : i*L+L+1]

Neighbouring chunks share one boundary token, so every token but a region's first is a target exactly once.

Training batches are a pure function of (step, micro_step, rank, world_size, micro_batch_size, grad_accum):
the global batch G = micro_batch_size * grad_accum * world_size takes stream positions
[step*G, (step+1)*G); micro-batch (micro_step, rank) takes the micro_batch_size positions starting at
step*G + (micro_step*world_size + rank) * micro_batch_size; position p is training chunk perm_e[p mod n]
of epoch e = p // n, perm_e a seeded permutation of the n training chunks. Hence a run resumed at a step sees
exactly the batches of an uninterrupted one (no data state to checkpoint beyond the step), ranks see
disjoint chunks, and 1 worker with grad_accum=2 sees the same global batch as 2 workers with grad_accum=1.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from curvtrain.models.data.corpus import DEFAULT_CORPUS, corpus_fingerprint, iter_pieces
from curvtrain.models.data.readers import Piece, ReadOptions
from curvtrain.models.data.tokenizer import (DEFAULT_TOKENIZER, EOS_NAMES, Tokenizer, train_sentencepiece,
                                             trained_vocab_size)
from curvtrain.models.files import atomic_file
from curvtrain.models.llama import LlamaConfig, llama_config

# Bump when the token file layout (dtype, document separators) changes, so caches are rebuilt.
FORMAT_VERSION = 2
# Characters of text per batched encoding call: enough to keep every core busy, few enough to bound memory.
ENCODE_BATCH_CHARS = 4 << 20


@dataclass(kw_only=True)
class DataConfig:
    """What text to train on, how it is tokenized, and how the token stream is cut into samples."""

    corpus: str = DEFAULT_CORPUS
    """A built-in corpus (models.data.corpus.BUILTIN_CORPORA) or a path to .txt, .jsonl[.gz|.zst], .parquet or
    .arrow files, a folder of them, or a `datasets.save_to_disk` folder (models.data.readers)."""
    tokenizer: str = DEFAULT_TOKENIZER
    """A built-in tokenizer (models.data.tokenizer.BUILTIN_TOKENIZERS), a SentencePiece .model file, a
    Hugging Face tokenizer.json (or a folder holding one), or `train:N`: a SentencePiece BPE of N tokens
    trained on the corpus once and cached (for small models, e.g. train:4096)."""
    text_column: str = "text"
    """The field of a JSON-lines record, or the column of a Parquet/Arrow table, that holds the text."""
    encoding: str = "utf-8"
    """Text encoding of .txt and .jsonl[.gz|.zst] files."""
    skip_undecodable: bool = False
    """Leave out, with a warning, a text file that does not decode in `encoding` (else it is an error)."""
    seq_len: int = 128
    """Tokens per training sample; each sample reads seq_len + 1 tokens (inputs and shifted targets)."""
    val_fraction: float = 0.02
    """Fraction of the token stream held out for validation, taken from its end."""
    cache_dir: str = field(default_factory=lambda: os.environ.get("CURVTRAIN_CACHE", "~/.cache/curvtrain"))
    """Where tokenized corpora are kept; the CURVTRAIN_CACHE environment variable sets the default."""
    seed: int = 0
    """Seed of the per-epoch shuffle of training chunks."""

    def __post_init__(self):
        for name in ("corpus", "tokenizer", "cache_dir", "text_column"):
            if not getattr(self, name):
                raise ValueError(f"DataConfig.{name} must be a non-empty string")
        trained_vocab_size(self.tokenizer)  # a malformed train:N fails here
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"DataConfig.encoding {self.encoding!r} is not a text encoding Python knows") from None
        if self.seq_len < 1:
            raise ValueError(f"DataConfig.seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"DataConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.seed < 0:
            raise ValueError(f"DataConfig.seed must be >= 0, got {self.seed}")

    @property
    def read_options(self) -> ReadOptions:
        return ReadOptions(text_column=self.text_column, encoding=self.encoding, skip_undecodable=self.skip_undecodable)


# ---- the tokenizer and the model it feeds ----------------------------------------------------------


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    """cfg.tokenizer (trained on the corpus first, for train:N), checked to have the EOS token the token file
    separates documents with."""
    vocab_size = trained_vocab_size(cfg.tokenizer)
    tokenizer = Tokenizer.load(cfg.tokenizer if vocab_size is None else str(_trained_tokenizer(cfg, vocab_size)))
    if tokenizer.eos_id is None:
        raise ValueError(
            f"data.tokenizer={cfg.tokenizer!r} has no end-of-sequence token (eos_id=None; a SentencePiece model "
            f"trained with eos_id=-1, or a tokenizer.json without any of {', '.join(EOS_NAMES)} and no "
            f"tokenizer_config.json eos_token): the token file needs one after every document"
        )
    return tokenizer


def _trained_tokenizer(cfg: DataConfig, vocab_size: int) -> Path:
    """<cache_dir>/tokenizer-<key>/tokenizer.model, trained on the corpus unless there already; key = hash(format
    version, corpus fingerprint, how the files are read, vocab_size, sentencepiece version)."""
    import sentencepiece

    opts = cfg.read_options
    payload = json.dumps([FORMAT_VERSION, corpus_fingerprint(cfg.corpus), opts.text_column, opts.encoding,
                          opts.skip_undecodable, vocab_size, sentencepiece.__version__]).encode()
    path = Path(cfg.cache_dir).expanduser() / f"tokenizer-{hashlib.sha256(payload).hexdigest()[:16]}" / "tokenizer.model"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = (line for text, _ in iter_pieces(cfg.corpus, opts) for line in text.split("\n") if line.strip())
        train_sentencepiece(lines, vocab_size, path)
    return path


def model_config(name: str, data: DataConfig, vocab_size: int = 0) -> LlamaConfig:
    """The LLaMA shape `name` sized for the data's tokenizer: vocab_size = the tokenizer's vocabulary, or
    `vocab_size` where given (≥ the tokenizer's; a padded embedding). Pretraining, federated training and export
    all build their model config here."""
    tokenizer = load_tokenizer(data)
    if vocab_size and vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={vocab_size} is smaller than the vocabulary of data.tokenizer={data.tokenizer!r} "
            f"({tokenizer.vocab_size} tokens): its ids would index past the embedding; set model.vocab_size "
            f">= {tokenizer.vocab_size}, or 0 to take the tokenizer's"
        )
    return llama_config(name, vocab_size=vocab_size or tokenizer.vocab_size)


# ---- tokenize once -------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 where every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare_tokens(cfg: DataConfig) -> Path:
    """Tokenize cfg.corpus with cfg.tokenizer unless cached; return the directory holding tokens.bin and
    meta.json. Raises ValueError when the corpus is too small for one training and one validation sample."""
    tokenizer = load_tokenizer(cfg)
    out_dir = Path(cfg.cache_dir).expanduser() / _cache_key(cfg, tokenizer)
    if not (out_dir / "meta.json").is_file():
        _tokenize(cfg, tokenizer, out_dir)
    num_tokens = json.loads((out_dir / "meta.json").read_text())["num_tokens"]
    _split(num_tokens, cfg.seq_len, cfg.val_fraction, source=f"corpus {cfg.corpus!r}")
    return out_dir


def _cache_key(cfg: DataConfig, tokenizer: Tokenizer) -> str:
    opts = cfg.read_options
    payload = json.dumps([FORMAT_VERSION, corpus_fingerprint(cfg.corpus), opts.text_column, opts.encoding,
                          opts.skip_undecodable, tokenizer.sha256()]).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def _tokenize(cfg: DataConfig, tokenizer: Tokenizer, out_dir: Path) -> None:
    """Write tokens.bin, then meta.json, each under a temporary name moved into place when complete: a
    present meta.json means a complete token file, whatever concurrent or failed runs did."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_tokens = num_docs = 0
    with atomic_file(out_dir / "tokens.bin") as f:
        for batch in _batches(iter_pieces(cfg.corpus, cfg.read_options), ENCODE_BATCH_CHARS):
            for ids, (_, last) in zip(tokenizer.encode_batch([text for text, _ in batch]), batch):
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                num_tokens += len(ids)
                if last:
                    f.write(eos.tobytes())
                    num_tokens, num_docs = num_tokens + 1, num_docs + 1
    meta = {
        "format_version": FORMAT_VERSION,
        "num_tokens": num_tokens,
        "num_docs": num_docs,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "corpus": cfg.corpus,
        "tokenizer": str(tokenizer.path),
    }
    with atomic_file(out_dir / "meta.json") as f:
        f.write(json.dumps(meta, indent=2).encode())


def _batches(pieces: Iterable[Piece], max_chars: int) -> Iterator[list[Piece]]:
    """Consecutive pieces in lists of about max_chars characters (at least one piece each)."""
    batch, chars = [], 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[0])
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _split(num_tokens: int, seq_len: int, val_fraction: float, source: str) -> tuple[int, int, int]:
    """(first validation token, training chunks, validation chunks) of a stream of num_tokens tokens."""
    val_start = num_tokens - int(num_tokens * val_fraction)
    num_train, num_val = (val_start - 1) // seq_len, (num_tokens - val_start - 1) // seq_len
    if num_train < 1 or num_val < 1:
        raise ValueError(
            f"{source} has {num_tokens} tokens: too few for one training and one validation sample of "
            f"seq_len + 1 = {seq_len + 1} tokens with val_fraction={val_fraction} (the validation region "
            f"holds {num_tokens - val_start} tokens); use a larger corpus, a shorter seq_len or a larger val_fraction"
        )
    return val_start, num_train, num_val


# ---- deterministic sampling ----------------------------------------------------------------------


class TokenData:
    """Training and validation samples from a token file (the module docstring draws the layout)."""

    def __init__(self, path: str | Path, seq_len: int, val_fraction: float, seed: int = 0):
        """`path` is a tokens.bin file or the directory prepare_tokens returned."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokens.bin"
        if not path.is_file():
            raise FileNotFoundError(f"no token file at {path}: run prepare_tokens first")
        if seq_len < 1 or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"need seq_len >= 1 and 0 < val_fraction < 1, got {seq_len} and {val_fraction}")
        meta = path.parent / "meta.json"
        dtype = json.loads(meta.read_text()).get("dtype", "uint16") if meta.is_file() else "uint16"
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.seq_len, self.seed = seq_len, seed
        split = _split(len(self.tokens), seq_len, val_fraction, source=str(path))
        self._val_start, self._num_train, self._num_val = split
        self._permutations: dict[int, np.ndarray] = {}  # epoch -> permutation, the latest two epochs

    @classmethod
    def from_config(cls, cfg: DataConfig) -> TokenData:
        return cls(prepare_tokens(cfg), cfg.seq_len, cfg.val_fraction, cfg.seed)

    @property
    def num_train_samples(self) -> int:
        return self._num_train

    @property
    def num_val_samples(self) -> int:
        return self._num_val

    def sample_indices(
        self, step: int, micro_step: int, rank: int, world_size: int, micro_batch_size: int, grad_accum: int
    ) -> np.ndarray:
        """The training chunks of one micro-batch: the global sampling rule of the module docstring."""
        if not (0 <= rank < world_size and 0 <= micro_step < grad_accum and micro_batch_size >= 1 and step >= 0):
            raise ValueError(
                f"invalid position: step={step}, micro_step={micro_step} of grad_accum={grad_accum}, "
                f"rank={rank} of world_size={world_size}, micro_batch_size={micro_batch_size}"
            )
        global_batch = micro_batch_size * grad_accum * world_size
        first = step * global_batch + (micro_step * world_size + rank) * micro_batch_size
        epochs, offsets = np.divmod(np.arange(first, first + micro_batch_size), self._num_train)
        chunks = np.empty(micro_batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):  # one epoch, or two where the micro-batch straddles a boundary
            in_epoch = epochs == epoch
            chunks[in_epoch] = self._permutation(int(epoch))[offsets[in_epoch]]
        return chunks

    def train_batch(
        self, step: int, micro_step: int, rank: int, world_size: int, micro_batch_size: int, grad_accum: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 tensors of shape [micro_batch_size, seq_len]; targets = inputs shifted by one."""
        chunks = self.sample_indices(step, micro_step, rank, world_size, micro_batch_size, grad_accum)
        return self.read(0, chunks)

    def val_batches(
        self, micro_batch_size: int, rank: int, world_size: int, max_samples: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) micro-batches of the first max_samples validation chunks (all if None), in order.
        Rank r takes micro-batches r, r + world_size, ...; every rank gets the same number, floor(chunks /
        (micro_batch_size * world_size)), so collectives stay in step and the remainder is left out."""
        if not (0 <= rank < world_size and micro_batch_size >= 1 and (max_samples is None or max_samples >= 1)):
            raise ValueError(
                f"invalid validation split: rank={rank} of world_size={world_size}, "
                f"micro_batch_size={micro_batch_size}, max_samples={max_samples}"
            )
        num_chunks = self._num_val if max_samples is None else min(max_samples, self._num_val)
        per_rank = num_chunks // (micro_batch_size * world_size)
        if per_rank == 0:
            raise ValueError(
                f"{num_chunks} validation chunks are too few for one micro-batch of {micro_batch_size} per rank "
                f"on {world_size} ranks"
            )
        starts = range(rank * micro_batch_size, per_rank * world_size * micro_batch_size, world_size * micro_batch_size)
        return (self.read(self._val_start, np.arange(start, start + micro_batch_size)) for start in starts)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) == 2:
                del self._permutations[min(self._permutations)]
            rng = np.random.default_rng((self.seed, epoch))
            self._permutations[epoch] = rng.permutation(self._num_train)
        return self._permutations[epoch]

    @property
    def train_tokens(self) -> np.ndarray:
        """The training region of the token stream (memory-mapped)."""
        return self.tokens[: self._val_start]

    def read(self, region_start: int, chunks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the chunks numbered `chunks` counted from token `region_start`."""
        positions = region_start + chunks[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        rows = torch.from_numpy(np.asarray(self.tokens[positions], dtype=np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
