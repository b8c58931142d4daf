"""The check that every rank of a group sees the same RUN_DIR, before anything is written there.

A multi-node run needs RUN_DIR on a filesystem all nodes share: each rank writes its own checkpoint files,
and rank 0 seals the folder. A RUN_DIR that is a node-local folder on some nodes (a relative path that each
node resolves in its own working directory, a mount missing on one node) would seal checkpoints that hold
only some ranks' files. So at start-up each rank writes a marker RUN_DIR/.ranks/<group token>/rank<r>,
and rank 0, once all have written theirs, looks for every marker; if some are missing every rank stops with
`SharedStorageError`, naming those ranks, their nodes and the folder each of them sees.
"""
from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

import torch.distributed as dist

MARKERS = ".ranks"
SETTLE_S = 5.0
"""How long rank 0 keeps looking for missing markers: a network filesystem may show another node's new
file a moment late."""


class SharedStorageError(RuntimeError):
    """Some ranks of the group write RUN_DIR into a folder rank 0 does not see."""


def check_shared_run_dir(run_dir: Path, node: str) -> None:
    """Collective over the default process group: each rank (on Ray node `node`, named in the error) writes
    its marker; rank 0 checks it sees all of them, then removes its marker folder. Raises
    SharedStorageError on every rank if it does not."""
    rank, world = dist.get_rank(), dist.get_world_size()
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)  # one folder per group start
    folder = Path(run_dir) / MARKERS / token[0]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}").write_text(node)
    where = [None] * world
    dist.all_gather_object(where, (node, os.path.abspath(run_dir)))  # after it, every marker is written
    missing = [None]
    if rank == 0:
        deadline = time.monotonic() + SETTLE_S
        while (lost := [r for r in range(world) if not (folder / f"rank{r}").is_file()]) and time.monotonic() < deadline:
            time.sleep(0.5)
        missing[0] = lost
        shutil.rmtree(folder, ignore_errors=True)
    dist.broadcast_object_list(missing, src=0)
    if missing[0]:
        ranks = "; ".join(f"rank {r} on node {where[r][0]} writes to {where[r][1]}" for r in missing[0])
        raise SharedStorageError(
            f"RUN_DIR is not one shared folder: rank 0 (node {where[0][0]}, {where[0][1]}) does not see the markers "
            f"of {ranks}. A multi-node run needs RUN_DIR on a filesystem every node mounts at the same absolute "
            f"path (README, \"Elastic runs\"); nothing was written to RUN_DIR's checkpoints")
