"""Step time, memory and optimizer state of whole `curvtrain pretrain` runs (Ray workers, DeepSpeed engines,
the real corpus), each in its own process, rows repeated and interleaved (A B C A B C ...): the curvature
optimizers (Sophia, AdaHessian, M-FAC) and the owner-sharded path against our AdamW, and 1 vs N workers.

    # CPU stand-in (2-core VM): 20m, fp32, 16×128 tokens per step, 1 and 2 workers of one core
    python scripts/bench_pretrain.py --device cpu --model 20m --workers 1 2 --steps 30 --repeats 2
    # GPU: 2 GPUs, one worker each, bf16 weights
    python scripts/bench_pretrain.py --device cuda --model 20m --workers 2 --steps 60 --precision bf16 --batch 64 --seq 256

Rows (`--optimizers`): adamw (ZeRO-1, the default engine: moments sharded by DeepSpeed); adamw_owner (the
same AdamW owner-sharded at ZeRO 0 with per-layer updates: the cost of the owner-sharded communication
itself); gradnorm_lorp (rank 64, owner-sharded, whole step); gradnorm_lorp_per_layer (the same stepped
per layer inside backward, its communication overlapped); sophia (Sophia-G, a GNB estimate every k = 10
steps on one micro-batch per worker, sharing that micro-batch's forward); adahessian (a Hutchinson
estimate every step by double backward, whose first backward is the step's gradient); adahessian_fd (the
same estimate by a finite difference of gradients: two ordinary forward/backward passes per step); mfac
(window m = 32, blocks of 16384); mfac_gns (the same with GNS damping); muon (ours, owner-sharded at ZeRO 0,
match_rms_adamw: AdamW's lr); deepspeed_muon (DeepSpeed's own Muon at ZeRO 1, the outside anchor: Muon
lr 0.02 with the original scale, no clipping). Measured per run:
- amortized ms/step: (elapsed at the last step − elapsed at step --skip) / (steps − skip), from rank 0's
  metrics.jsonl; the window is a multiple of Sophia's k, so its estimates are amortized exactly;
- peak memory: rank 0's `peak_memory_gib` (CUDA: max allocated; CPU: peak RSS of the worker process,
  which includes Ray and DeepSpeed);
- optimizer state per worker: the size of each rank's optimizer checkpoint file at the last step,
  against the whole model's state (owner-sharded rows: Σ state_numel × 4 bytes, the optimizer's own cost
  model; AdamW: 2 moments × 4 bytes per parameter).
Ratios (× AdamW at the same worker count, N workers vs the fewest) are claimed only where the runs'
ranges do not overlap (`benchlib.ratio`).
Goals: issue 8 (20m, 2 workers) Sophia ≤ 1.08× AdamW, AdaHessian ≤ 2×, M-FAC m = 32 ≤ 1.3×, state per
worker ≈ 1/N; issue 10: 2 workers ≥ 1.6× the tokens/s of 1 for AdamW and GradNormLoRP.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.benchlib import Spread, add_common_args, cuda_available, ratio, run_child, run_interleaved  # noqa: E402

ROWS = {
    "adamw": ["optimizer.name=adamw", "engine.zero_stage=1"],
    "adamw_owner": ["optimizer.name=adamw", "engine.zero_stage=0", "optimizer.per_layer=true", "engine.grad_clip=0"],
    "gradnorm_lorp": ["optimizer.name=gradnorm_lorp", "engine.zero_stage=0", "optimizer.lowrank.rank=64"],
    "gradnorm_lorp_per_layer": ["optimizer.name=gradnorm_lorp", "engine.zero_stage=0", "optimizer.lowrank.rank=64",
                                "optimizer.per_layer=true", "engine.grad_clip=0"],
    "sophia": ["optimizer.name=sophia", "engine.zero_stage=0", "optimizer.sophia.every=10", "optimizer.sophia.micro_batches=1"],
    "adahessian": ["optimizer.name=adahessian", "engine.zero_stage=0", "optimizer.adahessian.every=1"],
    "adahessian_fd": ["optimizer.name=adahessian", "engine.zero_stage=0", "optimizer.adahessian.every=1",
                      "optimizer.adahessian.method=finite_difference"],
    "mfac": ["optimizer.name=mfac", "engine.zero_stage=0", "optimizer.mfac.window=32"],
    "mfac_gns": ["optimizer.name=mfac", "engine.zero_stage=0", "optimizer.mfac.window=32", "optimizer.mfac.damping=gns",
                 "optimizer.lr=1.0", "optimizer.weight_decay=0", "engine.grad_clip=0"],
    "muon": ["optimizer.name=muon", "engine.zero_stage=0"],
    "deepspeed_muon": ["optimizer.name=deepspeed_muon", "engine.zero_stage=1", "optimizer.muon.adjust_lr_fn=original",
                       "optimizer.muon.lr=0.02", "engine.grad_clip=0"],
}
LR = {  # plausible values; time does not depend on them
    "adamw": 3e-3, "adamw_owner": 3e-3, "gradnorm_lorp": 5e-3, "gradnorm_lorp_per_layer": 5e-3, "sophia": 3e-3,
    "adahessian": 0.15, "adahessian_fd": 0.15, "mfac": 1e-3, "muon": 3e-3, "deepspeed_muon": 3e-3,
}


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

    from curvtrain.distributed.engine import build_model_and_optimizer
    from curvtrain.distributed.ownership import state_costs
    from curvtrain.optim import build_optimizer

    model, optimizer = build_model_and_optimizer(cfg, torch.device("meta"))
    optimizer_cfg = cfg.optimizer
    if optimizer is None:  # DeepSpeed's own (deepspeed_muon): the state of ours with the same split
        optimizer_cfg = dataclasses.replace(cfg.optimizer, name="muon")
        optimizer = build_optimizer(optimizer_cfg, model.named_parameters())
    names = {p: n for n, p in model.named_parameters()}
    return 4 * sum(state_costs(optimizer, names, own_cost=optimizer_cfg.needs.state_cost).values())


def run_one(spec: dict) -> dict:
    from curvtrain.distributed.coordinator import Coordinator
    from curvtrain.distributed.distributor import OPTIMIZER_SHARD, OwnerDistributor, distributor_for
    from curvtrain.distributed.metrics import read_metrics
    from curvtrain.launcher.cluster import connect

    cfg = config(spec)
    connect(None, num_cpus_needed=cfg.workers.num_workers * cfg.workers.cpus_per_worker,
            num_gpus_needed=cfg.workers.num_workers if cfg.workers.use_gpu else 0)
    with tempfile.TemporaryDirectory() as run_dir:
        Coordinator(cfg, Path(run_dir)).run()
        records = {r["step"]: r for r in read_metrics(Path(run_dir))}
        ckpt = Path(run_dir) / "checkpoints" / f"step_{spec['steps']:08d}"
        owner = distributor_for(cfg) is OwnerDistributor
        pattern = OPTIMIZER_SHARD if owner else "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
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
    p.add_argument("--workers", type=int, nargs="+", default=[2], help="worker counts to run every row at")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences); one micro-batch per worker")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=10, help="steps left out of the timing (start-up); steps − skip is a multiple of 10")
    p.add_argument("--repeats", type=int, default=1, help="runs of each row, interleaved; medians and ranges")
    p.add_argument("--optimizers", nargs="+", default=["adamw", "sophia", "adahessian", "mfac"], choices=list(ROWS))
    add_common_args(p, threads_help="CPU cores (and torch threads) per worker")
    args = p.parse_args()
    if run_child(args, run_one):
        return
    if (args.steps - args.skip) % 10 or args.skip < 1:
        p.error("--steps − --skip must be a positive multiple of 10 (Sophia's k), and --skip ≥ 1")
    base = dict(device=args.device, model=args.model, batch=args.batch, seq=args.seq, steps=args.steps,
                skip=args.skip, threads=args.threads, precision=args.precision or ("bf16" if args.device == "cuda" else "fp32"))
    specs = [{**base, "optimizer": name, "workers": n} for n in args.workers for name in args.optimizers]
    print(f"{args.model} {base['precision']}, {args.batch}×{args.seq} tokens per step, ms/step over steps "
          f"{args.skip}..{args.steps}, {args.repeats} interleaved run(s) per row: median [min–max]", flush=True)
    results = run_interleaved(__file__, specs, args.repeats, label=lambda spec: f"{spec['optimizer']} ×{spec['workers']}")
    ms = {(s["optimizer"], s["workers"]): Spread(tuple(r["ms_per_step"] for r in runs)) for s, runs in zip(specs, results)}
    print(f"{'optimizer':13s} {'workers':>7s} {'ms/step':>28s} {'× AdamW':>44s} {'peak GiB':>9s} {'state/worker MiB':>18s} "
          f"{'whole MiB':>10s} {'max share':>9s} {'loss':>6s}", flush=True)
    for spec, runs in zip(specs, results):
        key, first = (spec["optimizer"], spec["workers"]), runs[0]
        adamw = ms.get(("adamw", spec["workers"]))
        vs = ratio(ms[key], adamw) if adamw and spec["optimizer"] != "adamw" else "-"
        per_worker = " / ".join(f"{b / 2**20:.1f}" for b in first["state_file_bytes"])
        share = max(first["state_file_bytes"]) / first["whole_state_bytes"]
        print(f"{spec['optimizer']:13s} {spec['workers']:7d} {ms[key]!s:>28s} {vs:>44s} {max(r['peak_gib'] for r in runs):9.2f} "
              f"{per_worker:>18s} {first['whole_state_bytes'] / 2**20:10.1f} {share:9.2f} {first['final_loss']:6.3f}", flush=True)
    if len(args.workers) > 1:
        fewest, tokens = min(args.workers), args.batch * args.seq
        print(f"tokens/s, and N workers vs {fewest}:")
        for spec in specs:
            if spec["workers"] != fewest:
                rate = Spread(tuple(1000 * tokens / v for v in ms[(spec["optimizer"], spec["workers"])].values))
                base_rate = Spread(tuple(1000 * tokens / v for v in ms[(spec["optimizer"], fewest)].values))
                print(f"  {spec['optimizer']:13s} {spec['workers']} workers {rate!s:24s} vs {fewest}: {base_rate!s:24s} "
                      f"{ratio(rate, base_rate)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([{**s, "runs": r} for s, r in zip(specs, results)], indent=1))


if __name__ == "__main__":
    main()
