"""Convergence at a fixed token budget: AdamW vs GradNormLoRP vs galore-torch's GaLoreAdamW at the same
rank, and the curvature optimizers (Sophia, AdaHessian, M-FAC), each at a few learning rates, all through
`curvtrain pretrain` (same model init, same data order, same schedule, same workers) — only the
optimizer differs.

    python scripts/bench_convergence.py --model 20m --steps 120 --rank 64 --seeds 0 1 2 --out docs/convergence
    python scripts/bench_convergence.py --model 20m --steps 120 --rank 64 --seeds 0 1 2 --out docs/convergence \
        --optimizers adamw gradnorm_lorp galore_adamw sophia adahessian mfac      # runs already in OUT.json are reused

Protocol: every learning rate of GRID is run at the first seed (model init and data order); each
optimizer's best learning rate there is then run again at the other seeds, and optimizers are compared
by the mean validation loss over all seeds at their tuned learning rate (the tuning seed included).
Writes OUT.json (every run's final validation loss and curves) and OUT.png (loss curves of each
optimizer's tuned learning rate, first seed), and prints markdown tables. Runs already in OUT.json
with the same settings are reused, so a grid can be extended without repeating it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRID = {
    "adamw": [1e-3, 2e-3, 3e-3, 5e-3, 1e-2],
    "gradnorm_lorp": [3e-3, 5e-3, 1e-2, 2e-2, 3e-2],
    "galore_adamw": [3e-3, 5e-3, 1e-2, 2e-2, 3e-2],
    "sophia": [3e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2],
    "adahessian": [0.015, 0.05, 0.15, 0.5],
    "mfac": [1e-4, 3e-4, 1e-3, 3e-3],
}
# Settings that make runs comparable (and reusable from an earlier OUT.json).
SETTINGS = ("model", "steps", "seq", "batch", "workers", "rank", "update_gap", "eval_interval", "eval_samples")


def train(args, optimizer: str, lr: float, seed: int) -> dict:
    from curvtrain.distributed.config import TrainConfig
    from curvtrain.distributed.coordinator import Coordinator
    from curvtrain.distributed.metrics import read_metrics
    from curvtrain.launcher.config import load_config

    cfg = load_config(TrainConfig, None, [
        f"model.name={args.model}", f"data.seq_len={args.seq}",
        f"batch.global_batch_size={args.batch}", f"batch.micro_batch_size={args.batch // args.workers}",
        f"workers.num_workers={args.workers}", "engine.zero_stage=0", "engine.precision=fp32",
        f"optimizer.name={optimizer}", f"optimizer.lr={lr}", "optimizer.weight_decay=0.0",
        f"optimizer.lowrank.rank={args.rank}", f"optimizer.lowrank.update_gap={args.update_gap}",
        f"schedule.max_steps={args.steps}", f"schedule.warmup_steps={args.steps // 10}",
        f"run.eval_interval={args.eval_interval}", f"run.eval_samples={args.eval_samples}",
        f"run.checkpoint_interval={args.steps}", "run.log_interval=1", f"run.seed={seed}", f"data.seed={seed}",
    ])
    with tempfile.TemporaryDirectory() as run_dir:
        Coordinator(cfg, Path(run_dir)).run()
        records = read_metrics(Path(run_dir))
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    return {"optimizer": optimizer, "lr": lr, "seed": seed, "val_loss": val[-1][1], "val_ppl": math.exp(val[-1][1]),
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
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="the first tunes the learning rate")
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="sweep only these rates of each grid (a reduced grid)")
    p.add_argument("--tuned-seeds-for", nargs="+", default=None,
                   help="optimizers whose tuned rate is run at the other seeds (default: all)")
    p.add_argument("--out", default="docs/convergence")
    args = p.parse_args()

    from curvtrain.launcher.cluster import connect

    out = Path(f"{args.out}.json")
    settings = {k: getattr(args, k) for k in SETTINGS}
    previous = json.loads(out.read_text()) if out.exists() else {}
    cached = {_key(r): r for r in previous.get("runs", []) if previous.get("settings") == settings}
    connect(None, num_cpus_needed=args.workers)
    runs: list[dict] = []

    def run(optimizer: str, lr: float, seed: int) -> dict:
        r = cached.get((optimizer, lr, seed)) or train(args, optimizer, lr, seed)
        runs.append(r)
        print(f"{optimizer:14s} lr {lr:<6g} seed {seed} val_loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.1f})", flush=True)
        out.write_text(json.dumps({"settings": settings, "runs": runs}, indent=1))
        return r

    tuned = {}
    for optimizer in args.optimizers:
        grid = [lr for lr in GRID[optimizer] if args.lrs is None or lr in args.lrs or (optimizer, lr, args.seeds[0]) in cached]
        sweep = [run(optimizer, lr, args.seeds[0]) for lr in grid]
        tuned[optimizer] = min(sweep, key=lambda r: r["val_loss"])
        if args.tuned_seeds_for is None or optimizer in args.tuned_seeds_for:
            for seed in args.seeds[1:]:
                run(optimizer, tuned[optimizer]["lr"], seed)
    plot(tuned, Path(f"{args.out}.png"))

    lrs = sorted({r["lr"] for r in runs})
    print(f"\nlearning-rate sweep, seed {args.seeds[0]}: validation perplexity")
    print("| optimizer | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
    for name in tuned:
        cells = {r["lr"]: f"{r['val_ppl']:.1f}" for r in runs if r["optimizer"] == name and r["seed"] == args.seeds[0]}
        print(f"| {name} | " + " | ".join(cells.get(lr, "—") for lr in lrs) + " |")
    print(f"\nat the tuned learning rate, seeds {args.seeds}: validation loss")
    print("| optimizer | lr | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean loss | mean ppl |")
    for name, best in tuned.items():
        losses = [r["val_loss"] for r in runs if r["optimizer"] == name and r["lr"] == best["lr"]]
        mean = sum(losses) / len(losses)
        print(f"| {name} | {best['lr']:g} | " + " | ".join(f"{x:.4f}" for x in losses)
              + f" | {mean:.4f} | {math.exp(mean):.1f} |")
    if "adamw" in tuned:
        print_steps_to_reach(runs, tuned)


def print_steps_to_reach(runs: list[dict], tuned: dict[str, dict]) -> None:
    """For each optimizer's tuned rate and seed: the first evaluated step whose validation loss is at or
    below tuned AdamW's final validation loss (mean over its seeds)."""
    adamw = [r["val_loss"] for r in runs if r["optimizer"] == "adamw" and r["lr"] == tuned["adamw"]["lr"]]
    target = sum(adamw) / len(adamw)
    print(f"\nsteps to reach tuned AdamW's final validation loss ({target:.4f}, mean of {len(adamw)} seeds)")
    print("| optimizer | lr | steps per seed |")
    for name, best in tuned.items():
        reached = [next((step for step, loss in r["val"] if loss <= target), None)
                   for r in runs if r["optimizer"] == name and r["lr"] == best["lr"]]
        print(f"| {name} | {best['lr']:g} | " + ", ".join("not reached" if s is None else str(s) for s in reached) + " |")


def _key(run: dict) -> tuple[str, float, int]:
    return run["optimizer"], run["lr"], run.get("seed", 0)


if __name__ == "__main__":
    main()
