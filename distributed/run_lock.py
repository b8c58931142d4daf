"""One run at a time in a run directory: an exclusive `fcntl` lock on RUN_DIR/run.lock for the whole run.

The lock file names its holder (host, pid, start time). A second `pretrain`/`federate` with the same
`--out`, or a `--resume` of it, is refused (`RunDirLocked`, exit 2) before it reads or writes anything
there. The kernel drops the lock when the holder exits, however it exits (a crash or SIGKILL included),
so a stale lock file never blocks a later run. On release the file is removed, and so is the run
directory if this run created it and left nothing else in it (bad input writes nothing).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from curvtrain.distributed.checkpoint import RunDirError

LOCK = "run.lock"


class RunDirLocked(RunDirError):
    """Another live run holds the run directory."""


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on host {h['host']} (since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


@contextmanager
def hold(run_dir: Path) -> Iterator[Path]:
    """Hold RUN_DIR's lock for the block; RunDirLocked (naming the holder) if another run holds it."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirLocked(f"run directory {run_dir} is in use by another run: {_holder(path)} holds {path}; "
                               f"wait for it to finish or stop it (Ctrl-C), or choose another --out") from None
        try:  # the holder before us may have removed the file between our open and our lock: lock the file there now
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still locked: whoever opened it meanwhile retries on the new file
        os.close(fd)
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()
