"""A training worker as a Ray actor: joins the process group, runs a `Trainer`, reports a summary."""
from __future__ import annotations

import os
from pathlib import Path

import ray


@ray.remote
class TrainWorker:
    """One process, one data-parallel rank. Created by `WorkerGroup`; never shared between runs."""

    def __init__(self, rank: int, world_size: int, use_gpu: bool, cpus: int):
        self.rank, self.world_size, self.use_gpu = rank, world_size, use_gpu
        self.store = None  # rank 0: the process group's TCP store, listening from rendezvous_address() on
        import torch

        torch.set_num_threads(cpus)

    def pid(self) -> int:
        return os.getpid()

    def rendezvous_address(self, local: bool) -> tuple[str, int]:
        """Rank 0 only: opens the process group's TCP store on a port the OS picks and keeps it listening,
        so no other process can take the port before the group forms; returns (address, port)."""
        import torch.distributed as dist

        host = "127.0.0.1" if local else ray.util.get_node_ip_address()
        self.store = dist.TCPStore(host, 0, self.world_size, is_master=True, wait_for_workers=False)
        return host, self.store.port

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

        device = torch.device("cuda", 0) if self.use_gpu else torch.device("cpu")
        if self.use_gpu:
            torch.cuda.set_device(device)
        # The group forms on rank 0's store, listening since rendezvous_address(): the port was never free.
        store = self.store if self.rank == 0 else torch.distributed.TCPStore(*master, self.world_size, is_master=False)
        backend = "nccl" if self.use_gpu else "gloo"
        torch.distributed.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size)
        deepspeed.init_distributed(dist_backend=backend)  # adopts the process group
        from curvtrain.distributed.shared_storage import check_shared_run_dir

        node = f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:8]})"
        check_shared_run_dir(Path(run_dir), node)  # every rank sees the same RUN_DIR, or all stop here

        from curvtrain.distributed.trainer import Trainer

        trainer = Trainer(cfg, Path(run_dir), device, owners)
        if resume_from is not None:
            trainer.load_checkpoint(Path(resume_from))
        summary = trainer.fit()
        torch.distributed.destroy_process_group()
        return summary
