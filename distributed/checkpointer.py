"""The running group's side of checkpoints: each rank writes its files, all ranks seal them together, and
a resumed worker loads them back (the folder format and its verification are `checkpoint`'s).

What a rank writes: its distributor's files (DeepSpeed's engine files; the owner distributor's optimizer
shard), its trainer state (step, tokens, RNG) and, on rank 0, the resolved config.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from curvtrain.distributed import checkpoint
from curvtrain.distributed.config import TrainConfig, save_config
from curvtrain.distributed.distributor import Distributor


class Checkpointer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, engine, distributor: Distributor):
        self.cfg, self.root, self.engine, self.distributor = cfg, Path(run_dir) / "checkpoints", engine, distributor
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def save(self, step: int, trainer_state: dict) -> Path:
        """Checkpoint `step`, written and sealed; returns its folder."""
        ckpt = self.root / checkpoint.tag_for(step)
        self.write(ckpt, trainer_state)
        self.seal(ckpt, step)
        return ckpt

    def write(self, ckpt: Path, trainer_state: dict) -> None:
        """This rank's files of checkpoint folder `ckpt` (`checkpoint.writer_rank` names the writer)."""
        self.distributor.save(self.engine, ckpt)
        torch.save(trainer_state, ckpt / f"trainer_rank{self.rank}.pt")
        if self.rank == 0:
            save_config(self.cfg, ckpt / "config.yaml")

    def seal(self, ckpt: Path, step: int) -> None:
        """Each rank hashes the files it just wrote, all in parallel; rank 0 gathers the hashes, writes
        the manifest and LATEST, and prunes old checkpoints."""
        own = checkpoint.hash_own_files(ckpt, self.rank)
        hashes = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(own, hashes, dst=0)  # also: every rank's files are on disk
        if self.rank == 0:
            checkpoint.write_manifest(ckpt, hashes, step=step, world_size=self.world_size,
                                      zero_stage=self.cfg.engine.zero_stage, distributor=self.distributor.name)
            checkpoint.prune(self.root, self.cfg.run.keep_checkpoints)
        dist.barrier()

    def load(self, ckpt: Path) -> dict:
        """Load engine and optimizer state from checkpoint folder `ckpt`, which may have been written by
        another number of workers (the distributor reshards); returns this rank's trainer state — rank 0's
        for a rank the writer did not have (step, tokens and the RNG are seeded and drawn alike on every
        rank, except by bf16's stochastic rounding, whose draws then differ)."""
        ckpt = Path(ckpt)
        trainer_state = ckpt / f"trainer_rank{self.rank}.pt"
        if not trainer_state.is_file():
            trainer_state = ckpt / "trainer_rank0.pt"
        with checkpoint.weights_only_loading():  # DeepSpeed's loader too: nothing in a checkpoint is unpickled
            self.distributor.load(self.engine, ckpt)
            return torch.load(trainer_state, weights_only=True)
