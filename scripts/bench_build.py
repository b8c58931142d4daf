"""Peak host memory of building the model, as the trainer does, against its bytes in the run's dtype.

    python scripts/bench_build.py --model 7b --precision bf16                 # goal: peak <= 1.1 x 12.55 GiB
    python scripts/bench_build.py --model 1b --precision bf16 --modes eager built zero3
    python scripts/bench_build.py --model 7b --precision bf16 --modes zero3 --workers 2   # goal: per rank ~ half

Modes (each in its own process, or N processes for zero3, for a clean peak):
  eager  the construction before `build_llama`: LlamaForCausalLM in float32, then cast to the run's dtype
  built  `distributed.trainer.build_model_and_optimizer` at ZeRO 0: `models.llama.build_llama`, on the meta
         device then materialized parameter by parameter in the run's dtype
  zero3  the same at ZeRO-3 on --workers gloo processes: each module handed to `deepspeed.zero.Init` as soon
         as it is drawn; the peak is each rank's (DeepSpeed's process-group set-up included)

Peak = the process's resident high-water mark (VmHWM) during the build, the bytes already resident before it
(Python, torch, DeepSpeed: "before") included; the ratio to the model's bytes counts them too.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.benchlib import MemoryPhases, run_child, run_isolated  # noqa: E402


def train_config(spec: dict, zero_stage: int):
    from curvtrain.distributed.config import TrainConfig
    from curvtrain.launcher.config import load_config

    workers = spec["workers"] if zero_stage == 3 else 1
    return load_config(TrainConfig, None, [
        f"model.name={spec['model']}", f"engine.precision={spec['precision']}", f"engine.zero_stage={zero_stage}",
        f"workers.num_workers={workers}", f"batch.global_batch_size={workers}", "batch.micro_batch_size=1",
    ])


def measure(spec: dict, rank: int = 0) -> dict:
    import torch

    from curvtrain.distributed.engine import param_dtype
    from curvtrain.distributed.engine import build_model_and_optimizer
    from curvtrain.models.llama import LlamaForCausalLM, llama_config

    if spec["mode"] == "zero3":
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(spec["workers"]),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    cfg = train_config(spec, zero_stage=3 if spec["mode"] == "zero3" else 0)
    device, memory = torch.device("cpu"), MemoryPhases(torch.device("cpu"))
    with memory.phase("before"):
        torch.manual_seed(0)
    start = time.perf_counter()
    with memory.phase("build"):
        if spec["mode"] == "eager":
            model = LlamaForCausalLM(llama_config(spec["model"])).to(param_dtype(cfg))
        else:
            model, _ = build_model_and_optimizer(cfg, device)
    seconds = time.perf_counter() - start
    local = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in model.parameters())
    return {"rank": rank, "seconds": seconds, "peak_bytes": memory.peak["build"], "before_bytes": memory.end["before"],
            "local_weight_bytes": local}


def _zero3_rank(rank: int, spec: dict, results) -> None:
    import torch

    torch.set_num_threads(1)
    results[rank] = measure(spec, rank)


def run_one(spec: dict) -> dict:
    """One mode: in this process, or for zero3 in spec["workers"] spawned processes (one result per rank)."""
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["mode"] != "zero3":
        return {"ranks": [measure(spec)]}
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        spec = {**spec, "port": s.getsockname()[1]}
    results = mp.Manager().dict()
    mp.spawn(_zero3_rank, args=(spec, results), nprocs=spec["workers"])
    return {"ranks": [results[r] for r in range(spec["workers"])]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="7b")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--modes", nargs="+", default=["built"], choices=["eager", "built", "zero3"])
    p.add_argument("--workers", type=int, default=2, help="processes of the zero3 mode")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if run_child(args, run_one):
        return
    import torch

    from curvtrain.models.llama import LlamaForCausalLM, llama_config

    with torch.device("meta"):
        n = LlamaForCausalLM(llama_config(args.model)).num_parameters()
    model_bytes = n * (2 if args.precision == "bf16" else 4)
    print(f"{args.model}: {n / 1e9:.3f}B parameters = {model_bytes / 2**30:.2f} GiB in {args.precision}; "
          f"peak = resident high-water mark of the build", flush=True)
    rows, failed = [], []
    for mode in args.modes:
        spec = dict(mode=mode, model=args.model, precision=args.precision, workers=args.workers, threads=args.threads)
        result, stderr = run_isolated(__file__, spec)
        if result is None:
            failed.append(mode)
            print(f"{mode}: FAILED\n{stderr[-2000:]}", file=sys.stderr, flush=True)
            continue
        for r in result["ranks"]:
            rows.append({**spec, **r})
            print(f"{mode:6s} rank {r['rank']}  peak {r['peak_bytes'] / 2**30:6.2f} GiB = "
                  f"{r['peak_bytes'] / model_bytes:5.3f} x the model's bytes (before the build {r['before_bytes'] / 2**30:.2f} GiB); holds {r['local_weight_bytes'] / 2**30:6.2f} GiB "
                  f"of weights; {r['seconds']:6.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if failed:
        sys.exit(f"FAILED: {', '.join(failed)}")


if __name__ == "__main__":
    main()
