"""Atomic file writes: a reader sees the old file or the new one, never a partial one."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A temporary file beside `path`, open for binary writing: moved onto `path` when the block completes,
    deleted when it raises."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are for others to read too
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text.encode())
