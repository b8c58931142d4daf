"""Convergence at a fixed token budget: AdamW vs GradNormLoRP vs galore-torch's GaLoreAdamW at the same
rank, each at a few learning rates, all through `curvtrain pretrain` (same model init, same data order,
same schedule, same workers) — only the optimizer differs.

    python scripts/bench_convergence.py --model 20m --steps 120 --rank 64 --out docs/convergence

Writes OUT.json (every run's final validation loss and curves) and OUT.png (loss curves of each
optimizer's best learning rate), and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRID = {"adamw": [1e-3, 3e-3, 1e-2], "gradnorm_lorp": [3e-3, 1e-2, 3e-2], "galore_adamw": [3e-3, 1e-2, 3e-2]}


def train(args, optimizer: str, lr: float) -> dict:
    from distributed.config import TrainConfig
    from distributed.coordinator import Coordinator
    from distributed.metrics import read_metrics
    from launcher.config import load_config

    cfg = load_config(TrainConfig, None, [
        f"model.name={args.model}", f"data.seq_len={args.seq}",
        f"batch.global_batch_size={args.batch}", f"batch.micro_batch_size={args.batch // args.workers}",
        f"workers.num_workers={args.workers}", "engine.zero_stage=0", "engine.precision=fp32",
        f"optimizer.name={optimizer}", f"optimizer.lr={lr}", "optimizer.weight_decay=0.0",
        f"optimizer.lowrank.rank={args.rank}", f"optimizer.lowrank.update_gap={args.update_gap}",
        f"schedule.max_steps={args.steps}", f"schedule.warmup_steps={args.steps // 10}",
        f"run.eval_interval={args.eval_interval}", f"run.eval_samples={args.eval_samples}",
        f"run.checkpoint_interval={args.steps}", "run.log_interval=1",
    ])
    with tempfile.TemporaryDirectory() as run_dir:
        Coordinator(cfg, Path(run_dir)).run()
        records = read_metrics(Path(run_dir))
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    return {"optimizer": optimizer, "lr": lr, "val_loss": val[-1][1], "val_ppl": math.exp(val[-1][1]),
            "train": [(r["step"], r["loss"]) for r in records], "val": val,
            "tokens": records[-1]["tokens"], "tokens_per_s": records[-1]["tokens_per_s"]}


def plot(best: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in best.items():
        line, = ax.plot(*zip(*run["train"]), lw=0.8, alpha=0.6)
        ax.plot(*zip(*run["val"]), "o-", color=line.get_color(), label=f"{name} (lr {run['lr']:g}): val {run['val_loss']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token); lines train, dots validation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="20m")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rank", type=int, default=64, help="projection rank (d/4 for 20m)")
    p.add_argument("--update-gap", type=int, default=50)
    p.add_argument("--eval-interval", type=int, default=20)
    p.add_argument("--eval-samples", type=int, default=96)
    p.add_argument("--optimizers", nargs="+", default=list(GRID), choices=list(GRID))
    p.add_argument("--out", default="docs/convergence")
    args = p.parse_args()

    from launcher.cluster import connect

    connect(None, num_cpus_needed=args.workers)
    runs = []
    for optimizer in args.optimizers:
        for lr in GRID[optimizer]:
            runs.append(train(args, optimizer, lr))
            r = runs[-1]
            print(f"{optimizer:14s} lr {lr:<6g} val_loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.1f})", flush=True)
            Path(f"{args.out}.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    best = {}
    for r in runs:
        if r["optimizer"] not in best or r["val_loss"] < best[r["optimizer"]]["val_loss"]:
            best[r["optimizer"]] = r
    plot(best, Path(f"{args.out}.png"))
    print("\n| optimizer | " + " | ".join(f"lr {lr:g}" for lr in sorted({r['lr'] for r in runs})) + " | best val ppl |")
    for name in best:
        cells = {r["lr"]: f"{r['val_ppl']:.1f}" for r in runs if r["optimizer"] == name}
        print(f"| {name} | " + " | ".join(cells.get(lr, "—") for lr in sorted({r['lr'] for r in runs}))
              + f" | {best[name]['val_ppl']:.1f} |")


if __name__ == "__main__":
    main()
