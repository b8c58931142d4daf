"""Bytes each rank writes into one checkpoint of a real `curvtrain pretrain` run (Ray workers, DeepSpeed
engines), per file and per rank (`checkpoint.writer_rank`), for a few optimizer settings; the interpreter
that runs it decides which checkout of curvtrain is measured, so two checkouts compare with one command.

    python scripts/bench_checkpoint_bytes.py --model 20m --rows adamw_per_layer gradnorm_lorp mfac
"""
from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

ROWS = {
    "adamw_per_layer": ["optimizer.name=adamw", "engine.zero_stage=0", "optimizer.per_layer=true", "engine.grad_clip=0"],
    "gradnorm_lorp": ["optimizer.name=gradnorm_lorp", "engine.zero_stage=0", "optimizer.lowrank.rank=64"],
    "mfac": ["optimizer.name=mfac", "engine.zero_stage=0", "optimizer.mfac.window=32"],
    "adamw_zero1": ["optimizer.name=adamw", "engine.zero_stage=1"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="20m")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = p.parse_args()

    from curvtrain.distributed import checkpoint
    from curvtrain.distributed.config import TrainConfig
    from curvtrain.distributed.coordinator import Coordinator
    from curvtrain.launcher.cluster import connect
    from curvtrain.launcher.config import load_config

    connect(None, num_cpus_needed=args.workers)
    for row in args.rows:
        cfg = load_config(TrainConfig, None, [
            f"model.name={args.model}", "data.seq_len=64", f"workers.num_workers={args.workers}",
            f"batch.global_batch_size={2 * args.workers}", "batch.micro_batch_size=2", "schedule.max_steps=1",
            "schedule.warmup_steps=1", "run.eval_interval=1", f"run.eval_samples={2 * args.workers}", *ROWS[row],
        ])
        with tempfile.TemporaryDirectory() as run_dir:
            Coordinator(cfg, Path(run_dir)).run()
            ckpt = checkpoint.latest(Path(run_dir) / "checkpoints")
            per_rank: dict[int, int] = defaultdict(int)
            files = []
            for f in sorted(ckpt.rglob("*")):
                if f.is_file():
                    name = str(f.relative_to(ckpt))
                    per_rank[checkpoint.writer_rank(name)] += f.stat().st_size
                    files.append(f"{name} {f.stat().st_size / 2**20:.1f}")
        print(f"{row}: " + ", ".join(f"rank {r} {b / 2**20:.1f} MiB" for r, b in sorted(per_rank.items()))
              + f"; total {sum(per_rank.values()) / 2**20:.1f} MiB [" + "; ".join(files) + "]", flush=True)


if __name__ == "__main__":
    main()
