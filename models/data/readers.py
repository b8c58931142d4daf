"""Readers of the corpus files users bring, streamed in bounded pieces.

  .txt                      one document per file
  .jsonl .jsonl.gz .jsonl.zst   one JSON object per line; its `text_column` field is a document
  .parquet .arrow           a table's `text_column` (string) column, one document per row, read a record batch
                            at a time (Parquet: within a row group); `.arrow` is Arrow's IPC stream or file
                            format, as `datasets.save_to_disk` writes it
A directory is searched recursively, in sorted path order; a `datasets.save_to_disk` DatasetDict folder
(dataset_dict.json) is read through its `train` split.

Every reader yields pieces `(text, last)`, `last` marking the final piece of a document, and no piece holds
more than `max_chars` characters: a longer document is cut at a line boundary (at a space, or anywhere, where a
line alone is longer), so memory stays bounded whatever the size of a file or document.
"""
from __future__ import annotations

import gzip
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

PIECE_CHARS = 1 << 16
"""Longest piece of text handed to the tokenizer at once (characters): SentencePiece encodes a 1 Mi-character
piece about 10x slower per byte than 64 Ki-character ones (measured, docs/benchmarks.md)."""

USER_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")

Piece = tuple[str, bool]


class CorpusError(ValueError):
    """A corpus file that cannot be read as text; the message names the file."""


class SkippedFileWarning(UserWarning):
    """A corpus file left out (data.skip_undecodable)."""


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """How user files are read (the fields of models.data.DataConfig with the same names)."""

    text_column: str = "text"
    encoding: str = "utf-8"
    skip_undecodable: bool = False
    max_chars: int = PIECE_CHARS


def suffix_of(path: Path) -> str | None:
    """The USER_SUFFIXES entry `path` ends with, if any."""
    return next((s for s in USER_SUFFIXES if path.name.endswith(s)), None)


def user_files(spec: str) -> tuple[Path, list[Path]]:
    """The root of a user corpus and its readable files in sorted order."""
    root = Path(spec).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"corpus {spec!r} is neither a built-in corpus nor an existing path")
    if root.is_file():
        if suffix_of(root) is None:
            raise ValueError(f"corpus file {root} must end in one of {USER_SUFFIXES}")
        return root.parent, [root]
    if (root / "dataset_dict.json").is_file():  # datasets.DatasetDict.save_to_disk: one folder per split
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise ValueError(f"{root} is a datasets DatasetDict without a 'train' split (it has {splits}): "
                             f"give the folder of the split to read")
        return user_files(str(root / "train"))
    files = sorted(p for p in root.rglob("*") if suffix_of(p) and p.is_file())
    if not files:
        raise ValueError(f"corpus directory {root} holds no files ending in one of {USER_SUFFIXES}")
    return root, files


def read_file(path: Path, opts: ReadOptions) -> Iterator[Piece]:
    """The pieces of every document of one file; decoding problems are a CorpusError naming the file (or,
    with opts.skip_undecodable, a SkippedFileWarning and no pieces)."""
    suffix = suffix_of(path)
    if suffix in (".parquet", ".arrow"):
        yield from _read_table(path, suffix, opts)
        return
    if opts.skip_undecodable and (problem := _undecodable(path, opts.encoding)):
        warnings.warn(f"skipping corpus file {path}: {problem}", SkippedFileWarning, stacklevel=2)
        return
    try:
        with _open_text(path, opts.encoding) as f:
            if suffix == ".txt":
                yield from split_stream(f, opts.max_chars)
            else:
                yield from _read_jsonl(path, f, opts)
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus file {path}: {_decode_problem(e, opts.encoding)}: set data.encoding to the "
                          f"file's encoding, or data.skip_undecodable=true to leave such files out with a "
                          f"warning") from None
    except (EOFError, OSError, *_zstd_errors()) as e:  # a truncated or corrupt .gz / .zst
        raise CorpusError(f"corpus file {path} cannot be read: {e}") from None


def _zstd_errors() -> tuple[type[Exception], ...]:
    try:
        import zstandard
    except ImportError:
        return ()
    return (zstandard.ZstdError,)


def _open_text(path: Path, encoding: str) -> TextIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding=encoding, newline="")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise CorpusError(f"corpus file {path} is zstd-compressed: pip install zstandard") from None
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True, read_across_frames=True)
        return io.TextIOWrapper(reader, encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def _undecodable(path: Path, encoding: str) -> str | None:
    """Why `path` does not decode as `encoding` (read in bounded chunks), or None if it does."""
    try:
        with _open_text(path, encoding) as f:
            while f.read(PIECE_CHARS):
                pass
    except UnicodeDecodeError as e:
        return _decode_problem(e, encoding)
    return None


def _decode_problem(e: UnicodeDecodeError, encoding: str) -> str:
    return f"not {encoding} text (byte 0x{e.object[e.start]:02x} at offset {e.start} of a read block: {e.reason})"


def _read_jsonl(path: Path, f: TextIO, opts: ReadOptions) -> Iterator[Piece]:
    field = opts.text_column
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise CorpusError(f'{path}, line {lineno}: expected a JSON object with a string "{field}" field '
                              f"(data.text_column names the field)")
        yield from split_text(record[field], opts.max_chars)


def _read_table(path: Path, suffix: str, opts: ReadOptions) -> Iterator[Piece]:
    """The text column of a Parquet file or Arrow IPC file/stream, a record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if suffix == ".parquet":
            table = pq.ParquetFile(path)
            schema, batches = table.schema_arrow, None
        else:
            source = pa.memory_map(str(path))
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
            schema = reader.schema
        column = opts.text_column
        if column not in schema.names:
            raise CorpusError(f"{path} has no column {column!r} (its columns: {schema.names}): set data.text_column")
        if not (pa.types.is_string(schema.field(column).type) or pa.types.is_large_string(schema.field(column).type)):
            raise CorpusError(f"{path}: column {column!r} holds {schema.field(column).type}, not strings")
        if suffix == ".parquet":
            batches = table.iter_batches(batch_size=256, columns=[column])
        else:
            batches = reader if isinstance(reader, pa.ipc.RecordBatchStreamReader) else (
                reader.get_batch(i) for i in range(reader.num_record_batches))
        for batch in batches:
            for text in batch.column(column).to_pylist():
                if text is not None:
                    yield from split_text(text, opts.max_chars)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"corpus file {path} is not a readable {suffix[1:]} table: {e}") from None


def split_text(text: str, max_chars: int) -> Iterator[Piece]:
    """A document held in memory, as pieces of at most max_chars characters."""
    if len(text) <= max_chars:
        yield text, True
    else:
        yield from split_stream(io.StringIO(text), max_chars)


def split_stream(f: TextIO, max_chars: int) -> Iterator[Piece]:
    """One document read from `f`, as pieces of at most max_chars characters cut after a newline (or a
    space; or anywhere, where a line alone is longer)."""
    rest = ""
    while chunk := f.read(max_chars - len(rest)):
        text = rest + chunk
        if len(text) < max_chars:
            rest = text
            continue
        cut = max(text.rfind("\n"), text.rfind(" ") if "\n" not in text else -1) + 1 or len(text)
        piece, rest = text[:cut], text[cut:]
        yield piece, False
    yield rest, True

