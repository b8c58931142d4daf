"""Checkpoint time of N workers: writing the files alone, and writing + sealing them (a manifest of every
file's sha256) — each rank hashing its own files in parallel, as the trainer does, or rank 0 hashing
all of them while the others wait (the earlier way) — on the checkpoints of one real `Trainer`
(DeepSpeed engine, gloo group, one process per rank), the three interleaved in each repeat.

    python scripts/bench_checkpoint.py --model 20m --workers 2 --repeats 5

Prints, per way, medians over repeats of rank 0's wall time from the barrier before the save to the
barrier after writing (write), and from there to the barrier after sealing (seal): every rank waits
at those barriers, so they are the times the save costs the run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

WAYS = ("write only", "sealed: each rank hashes its own files", "sealed: rank 0 hashes all files")


def worker(rank: int, args, port: int, run_dir: str, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.workers), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed
    import torch
    import torch.distributed as dist

    from curvtrain.distributed import checkpoint
    from curvtrain.distributed.trainer import Trainer

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    trainer = Trainer(config(args), Path(run_dir), torch.device("cpu"))
    trainer.train_step()  # the optimizer state exists
    times = {way: [] for way in WAYS}
    for repeat in range(args.repeats):
        for i, way in enumerate(WAYS):
            trainer.step = 1 + repeat * len(WAYS) + i
            ckpt = Path(run_dir) / "checkpoints" / checkpoint.tag_for(trainer.step)
            dist.barrier()
            start = time.perf_counter()
            trainer.write_checkpoint(ckpt)
            dist.barrier()
            written = time.perf_counter()
            if way == WAYS[1]:
                trainer.seal_checkpoint(ckpt)
            elif way == WAYS[2]:
                if rank == 0:
                    checkpoint.write_manifest(ckpt, [], step=trainer.step, world_size=args.workers, zero_stage=args.zero_stage)
                dist.barrier()
            times[way].append((written - start, time.perf_counter() - written))
            dist.barrier()
            if rank == 0:
                size = sum(p.stat().st_size for p in ckpt.iterdir())
                for p in ckpt.parent.glob("step_*"):
                    if p != ckpt:
                        shutil.rmtree(p)
    if rank == 0:
        queue.put({"times": times, "bytes": size})
    dist.destroy_process_group()


def config(args):
    from curvtrain.distributed.config import TrainConfig
    from curvtrain.launcher.config import load_config

    return load_config(TrainConfig, None, [
        f"model.name={args.model}", f"workers.num_workers={args.workers}", f"engine.zero_stage={args.zero_stage}",
        f"batch.global_batch_size={2 * args.workers}", "batch.micro_batch_size=2", "run.keep_checkpoints=100",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="20m")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import socket

    import torch.multiprocessing as mp

    from curvtrain.models.data import prepare_tokens

    prepare_tokens(config(args).data)  # the workers hit the token cache
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as run_dir:
        mp.spawn(worker, args=(args, port, run_dir, queue), nprocs=args.workers)
        result = queue.get()
    print(f"{args.model}, {args.workers} workers, ZeRO {args.zero_stage}: checkpoint of "
          f"{result['bytes'] / 2**20:.0f} MiB, {args.repeats} repeats\n")
    print("| checkpoint | write s (median) | seal s (median) | seal s (min–max) | total s (median) |\n|---|---|---|---|---|")
    for way, times in result["times"].items():
        write, seal = zip(*times)
        print(f"| {way} | {statistics.median(write):.3f} | {statistics.median(seal):.3f} | "
              f"{min(seal):.3f}–{max(seal):.3f} | {statistics.median(w + s for w, s in times):.3f} |")

if __name__ == "__main__":
    main()
