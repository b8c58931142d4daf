"""bf16 vs fp32: final validation loss of the same 20m run in both precisions, for GradNormLoRP and AdamW,
each run through `curvtrain pretrain` (a subprocess, its own local Ray runtime) with the same init and data.

    python scripts/bench_bf16.py --steps 100 --json docs/bf16.json

Configurations (2 CPU workers, ZeRO 0, 16×128 tokens per step, no weight decay):
  gradnorm_lorp        owner-sharded; bf16 = bf16 weights, no fp32 master copy
  adamw_per_layer      owner-sharded per-layer AdamW (grad_clip 0); bf16 = bf16 weights, no master copy
  adamw_deepspeed      DeepSpeed's bf16 path (ZeRO 0, grad_clip 0): bf16 model, fp32 master weights
  adamw_per_layer_lr3e-4  as adamw_per_layer at a 10× smaller learning rate (updates below bf16's resolution)
Prints one markdown row per optimizer: fp32 and bf16 validation loss and the relative gap.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "gradnorm_lorp": ["optimizer.name=gradnorm_lorp", "optimizer.lr=5e-3", "optimizer.lowrank.rank=64",
                      "optimizer.lowrank.update_gap=50"],
    "adamw_per_layer": ["optimizer.name=adamw", "optimizer.lr=3e-3", "optimizer.per_layer=true", "engine.grad_clip=0"],
    "adamw_deepspeed": ["optimizer.name=adamw", "optimizer.lr=3e-3", "engine.grad_clip=0"],
    # A 10× smaller rate: most updates are then below half a bf16 ulp of the weight.
    "adamw_per_layer_lr3e-4": ["optimizer.name=adamw", "optimizer.lr=3e-4", "optimizer.per_layer=true", "engine.grad_clip=0"],
}


def final_val_loss(config: str, precision: str, args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "curvtrain.launcher", "pretrain", "--out", str(run_dir),
               "--set", "model.name=20m", "--set", "engine.zero_stage=0", "--set", f"engine.precision={precision}",
               "--set", "optimizer.weight_decay=0.0", "--set", f"schedule.max_steps={args.steps}",
               "--set", f"schedule.warmup_steps={args.steps // 10}", "--set", f"run.eval_interval={args.steps}",
               "--set", "run.eval_samples=96", "--set", f"run.checkpoint_interval={args.steps}"]
        for override in CONFIGS[config]:
            cmd += ["--set", override]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{config} {precision} failed:\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["val_loss"] for r in records if "val_loss" in r][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--label", default="", help="a name for this code version, stored with the results")
    p.add_argument("--json", help="append the results here")
    args = p.parse_args()
    results = []
    for config in args.configs:
        row = {"config": config, "label": args.label, "steps": args.steps}
        for precision in args.precisions:
            row[precision] = final_val_loss(config, precision, args)
            print(f"{config} {precision}: val_loss {row[precision]:.4f}", flush=True)
        results.append(row)
        if args.json:
            path = Path(args.json)
            previous = json.loads(path.read_text()) if path.is_file() else []
            path.write_text(json.dumps(previous + [row], indent=1))
    print("| optimizer | fp32 val loss | bf16 val loss | bf16 vs fp32 |\n|---|---|---|---|")
    for r in results:
        if "fp32" in r and "bf16" in r:
            print(f"| {r['config']} {r['label']} | {r['fp32']:.4f} | {r['bf16']:.4f} | {100 * (r['bf16'] / r['fp32'] - 1):+.2f}% |")


if __name__ == "__main__":
    main()
