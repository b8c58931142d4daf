"""Per-client state (SCAFFOLD's cᵢ, FedSpeed's ĝᵢ) on disk in the run directory, not in memory.

    RUN_DIR/client_state/00000042.safetensors     client 42's state vectors (absent: never trained = zeros)

Memory holds only the states of the clients of the current round; disk holds those of clients that
have trained (FL-Simulator keeps a dense N × d tensor in memory instead). Every write replaces the file
atomically with a new one (a new inode), so a checkpoint takes a snapshot by hard-linking the current
files (no copy) and later writes never change the snapshot.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from curvtrain.models.files import atomic_file


class ClientStateStore:
    def __init__(self, root: Path, keys: tuple[str, ...], dim: int, dtype: torch.dtype = torch.float32):
        self.root, self.keys, self.dim, self.dtype = Path(root), keys, dim, dtype

    def path(self, client: int) -> Path:
        return self.root / f"{client:08d}.safetensors"

    def get(self, client: int) -> dict[str, torch.Tensor]:
        """Client `client`'s state (zeros if it never trained)."""
        if not self.keys:
            return {}
        path = self.path(client)
        if not path.is_file():
            return {k: torch.zeros(self.dim, dtype=self.dtype) for k in self.keys}
        return load_file(path)

    def put(self, client: int, state: dict[str, torch.Tensor]) -> None:
        if not self.keys:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path(client)) as f:
            f.write(save({k: state[k].contiguous() for k in self.keys}))

    def snapshot(self, dest: Path) -> None:
        """Hard-link every current file into `dest` (a checkpoint's copy, sharing the data blocks)."""
        dest.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.root.glob("*.safetensors")):
            os.link(path, dest / path.name)

    def restore(self, src: Path) -> None:
        """Make the store exactly the snapshot in `src` (resume)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        for path in sorted(Path(src).glob("*.safetensors")):
            os.link(path, self.root / path.name)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*.safetensors"))
