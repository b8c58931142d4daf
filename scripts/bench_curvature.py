"""Step time and memory of the curvature optimizers (Sophia, AdaHessian, M-FAC) against our AdamW, each
trained through `curvtrain pretrain` (Ray workers, DeepSpeed engines, the real corpus) in its own process.

    # CPU stand-in (2-core VM): 20m, 2 workers, fp32, 16×128 tokens per step
    python scripts/bench_curvature.py --device cpu --model 20m --workers 2 --steps 30
    # GPU: 2 GPUs, one worker each, bf16 weights
    python scripts/bench_curvature.py --device cuda --model 20m --workers 2 --steps 60 --precision bf16 --batch 64 --seq 256

Rows (`--optimizers`): adamw (ZeRO-1, the default engine: moments sharded by DeepSpeed), sophia (Sophia-G,
a GNB estimate every k = 10 steps on one micro-batch per worker), adahessian (a Hutchinson estimate every
step, double backward), mfac (window m = 32, blocks of 16384), mfac_gns (the same with GNS damping).
The curvature rows run owner-sharded at ZeRO 0. Measured per row:
- amortized ms/step: (elapsed at the last step − elapsed at step --skip) / (steps − skip), from rank 0's
  metrics.jsonl; the window is a multiple of Sophia's k, so its estimates are amortized exactly;
- peak memory: rank 0's `peak_memory_gib` (CUDA: max allocated; CPU: peak RSS of the worker process,
  which includes Ray and DeepSpeed);
- optimizer state per worker: the size of each rank's optimizer checkpoint file at the last step,
  against the whole model's state (owner-sharded rows: Σ state_numel × 4 bytes, the optimizer's own cost
  model; AdamW: 2 moments × 4 bytes per parameter).
Goals (issue 8, 20m, 2 workers): Sophia ≤ 1.08× AdamW, AdaHessian ≤ 2×, M-FAC m = 32 ≤ 1.3×; state per worker ≈ 1/N.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.benchlib import add_common_args, cuda_available, run_child, run_isolated  # noqa: E402

ROWS = {
    "adamw": ["optimizer.name=adamw", "engine.zero_stage=1"],
    "sophia": ["optimizer.name=sophia", "engine.zero_stage=0", "optimizer.sophia.every=10", "optimizer.sophia.micro_batches=1"],
    "adahessian": ["optimizer.name=adahessian", "engine.zero_stage=0", "optimizer.adahessian.every=1"],
    "mfac": ["optimizer.name=mfac", "engine.zero_stage=0", "optimizer.mfac.window=32"],
    "mfac_gns": ["optimizer.name=mfac", "engine.zero_stage=0", "optimizer.mfac.window=32", "optimizer.mfac.damping=gns",
                 "optimizer.lr=1.0", "optimizer.weight_decay=0", "engine.grad_clip=0"],
}
LR = {"adamw": 3e-3, "sophia": 3e-3, "adahessian": 0.15, "mfac": 1e-3}  # plausible values; time does not depend on them


def config(spec: dict):
    from curvtrain.distributed.config import TrainConfig
    from curvtrain.launcher.config import load_config

    name, workers = spec["optimizer"], spec["workers"]
    lr = [f"optimizer.lr={LR[name]}"] if name in LR else []
    return load_config(TrainConfig, None, [
        f"model.name={spec['model']}", f"data.seq_len={spec['seq']}", f"engine.precision={spec['precision']}",
        f"batch.global_batch_size={spec['batch']}", f"batch.micro_batch_size={spec['batch'] // workers}",
        f"workers.num_workers={workers}", f"workers.use_gpu={str(spec['device'] == 'cuda').lower()}",
        f"workers.cpus_per_worker={spec['threads']}",
        f"schedule.max_steps={spec['steps']}", "schedule.warmup_steps=1", "run.log_interval=1",
        f"run.eval_interval={spec['steps']}", f"run.eval_samples={spec['batch']}", f"run.checkpoint_interval={spec['steps']}",
        *lr, *ROWS[name],
    ])


def whole_state_bytes(cfg) -> int:
    """The whole model's optimizer state in bytes (fp32 statistics), before any sharding."""
    import torch

    from curvtrain.distributed.ownership import state_costs
    from curvtrain.distributed.trainer import build_model_and_optimizer

    model, optimizer = build_model_and_optimizer(cfg, torch.device("meta"))
    return 4 * sum(state_costs(optimizer, {p: n for n, p in model.named_parameters()}).values())


def run_one(spec: dict) -> dict:
    from curvtrain.distributed.coordinator import Coordinator
    from curvtrain.distributed.metrics import read_metrics
    from curvtrain.launcher.cluster import connect

    cfg = config(spec)
    connect(None, num_cpus_needed=cfg.workers.num_workers * cfg.workers.cpus_per_worker,
            num_gpus_needed=cfg.workers.num_workers if cfg.workers.use_gpu else 0)
    with tempfile.TemporaryDirectory() as run_dir:
        Coordinator(cfg, Path(run_dir)).run()
        records = {r["step"]: r for r in read_metrics(Path(run_dir))}
        ckpt = Path(run_dir) / "checkpoints" / f"step_{spec['steps']:08d}"
        pattern = "optimizer_rank{}.pt" if cfg.owner_sharded else "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
        state_files = [(ckpt / pattern.format(rank)).stat().st_size for rank in range(cfg.workers.num_workers)]
    last, skip = records[spec["steps"]], records[spec["skip"]]
    ms = 1000 * (last["elapsed_s"] - skip["elapsed_s"]) / (spec["steps"] - spec["skip"])
    return {"ms_per_step": ms, "peak_gib": last["peak_memory_gib"], "state_file_bytes": state_files,
            "whole_state_bytes": whole_state_bytes(cfg), "final_loss": last["loss"],
            **{k: last[k] for k in ("win_rate", "gns_gamma") if k in last}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--model", default="20m")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences); one micro-batch per worker")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=10, help="steps left out of the timing (start-up); steps − skip is a multiple of 10")
    p.add_argument("--optimizers", nargs="+", default=["adamw", "sophia", "adahessian", "mfac"], choices=list(ROWS))
    add_common_args(p, threads_help="CPU cores (and torch threads) per worker")
    args = p.parse_args()
    if run_child(args, run_one):
        return
    if (args.steps - args.skip) % 10 or args.skip < 1:
        p.error("--steps − --skip must be a positive multiple of 10 (Sophia's k), and --skip ≥ 1")
    base = dict(device=args.device, model=args.model, workers=args.workers, batch=args.batch, seq=args.seq,
                steps=args.steps, skip=args.skip, threads=args.threads,
                precision=args.precision or ("bf16" if args.device == "cuda" else "fp32"))
    print(f"{args.model} {base['precision']} {args.workers} workers, {args.batch}×{args.seq} tokens per step, "
          f"ms/step over steps {args.skip}..{args.steps}", flush=True)
    print(f"{'optimizer':11s} {'ms/step':>9s} {'x AdamW':>8s} {'peak GiB':>9s} {'state/worker MiB':>18s} "
          f"{'whole state MiB':>16s} {'max share':>10s} {'final loss':>10s}", flush=True)
    rows, adamw = [], None
    for name in args.optimizers:
        spec = {**base, "optimizer": name}
        result, stderr = run_isolated(__file__, spec)
        if result is None:
            print(f"{name}: FAILED\n{stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        rows.append({**spec, **result})
        if name == "adamw":
            adamw = result
        ratio = f"{result['ms_per_step'] / adamw['ms_per_step']:8.2f}" if adamw else f"{'-':>8s}"
        per_worker = " / ".join(f"{b / 2**20:.1f}" for b in result["state_file_bytes"])
        share = max(result["state_file_bytes"]) / result["whole_state_bytes"]
        print(f"{name:11s} {result['ms_per_step']:9.0f} {ratio} {result['peak_gib']:9.2f} {per_worker:>18s} "
              f"{result['whole_state_bytes'] / 2**20:16.1f} {share:10.2f} {result['final_loss']:10.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
