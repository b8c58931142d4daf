"""A training worker as a Ray actor: joins the process group, runs a `Trainer`, reports a summary."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import ray


@ray.remote
class TrainWorker:
    """One process, one data-parallel rank. Created by `WorkerGroup`; never shared between runs."""

    def __init__(self, rank: int, world_size: int, use_gpu: bool, cpus: int):
        self.rank, self.world_size, self.use_gpu = rank, world_size, use_gpu
        import torch

        torch.set_num_threads(cpus)

    def pid(self) -> int:
        return os.getpid()

    def rendezvous_address(self, local: bool) -> tuple[str, int]:
        """Rank 0's address and a free port for the process group's TCP store."""
        host = "127.0.0.1" if local else ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def run(self, cfg, run_dir: str, master: tuple[str, int], resume_from: str | None, owners: dict | None) -> dict:
        import warnings

        import torch

        # DeepSpeed calls torch.distributed's deprecated all_gather_into_tensor at every step
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)

        # DeepSpeed reads these even when a process group exists (else it tries MPI discovery).
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",  # Ray gives each GPU worker exactly one visible device
            MASTER_ADDR=master[0],
            MASTER_PORT=str(master[1]),
        )
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.use_gpu else "gloo")
        device = torch.device("cuda", 0) if self.use_gpu else torch.device("cpu")
        if self.use_gpu:
            torch.cuda.set_device(device)

        from curvtrain.distributed.trainer import Trainer

        trainer = Trainer(cfg, Path(run_dir), device, owners)
        if resume_from is not None:
            trainer.load_checkpoint(Path(resume_from))
        summary = trainer.fit()
        torch.distributed.destroy_process_group()
        return summary
