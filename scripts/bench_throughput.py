"""Training throughput, peak memory and MFU: our LLaMA vs Hugging Face `LlamaForCausalLM`, eager and
under `torch.compile`, both with torch AdamW (fused where the device has it), measured in one run;
plus the cost of curvtrain's distributed path (Ray worker + DeepSpeed engine, 1 worker) over the same
model in a plain loop.

    python scripts/bench_throughput.py --device cuda --model 1b --batch 16 --seq 256 1024   # GPU
    python scripts/bench_throughput.py --device cpu --model 20m --batch 8 --seq 256 --repeats 5   # CPU

Each measurement runs in its own process (clean peak memory); every configuration runs --repeats times,
interleaved with the others, and is reported as median [min–max]; a ratio between two configurations is
claimed only where their ranges do not overlap (`benchlib.ratio`). MFU = flops_per_token × tokens/s / peak,
flops_per_token = 6·N + 12·L·d·T (models.llama); peak = --peak-tflops on CUDA (790: dense bf16 as the
reference numbers use), and on CPU the measured fp32 matmul rate of the same process.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from curvtrain.distributed.metrics import peak_memory_bytes  # noqa: E402
from scripts.benchlib import Spread, add_common_args, cuda_available, ratio, run_child, run_interleaved, timed_ms  # noqa: E402


def cpu_peak_flops() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    n = 10
    for _ in range(n):
        a @ b
    return n * 2 * 2048**3 / (time.perf_counter() - t)


def build(impl: str, model_name: str):
    from curvtrain.models.llama import LlamaForCausalLM, llama_config

    cfg = llama_config(model_name)
    if impl == "hf":
        import transformers

        from curvtrain.models.hf import hf_config_dict

        hf_cfg = transformers.LlamaConfig(**hf_config_dict(cfg, bos_token_id=1, eos_token_id=2))
        hf_cfg._attn_implementation = "sdpa"
        model = transformers.LlamaForCausalLM(hf_cfg)
        step_loss = lambda x, y: model(input_ids=x, labels=y).loss  # HF shifts labels itself  # noqa: E731
    else:
        model = LlamaForCausalLM(cfg)
        step_loss = lambda x, y: model(x[:, :-1], y[:, 1:])  # noqa: E731
    return cfg, model, step_loss


def measure_plain(spec: dict) -> dict:
    """Our model or HF's in a plain loop: forward, backward, AdamW step."""
    import torch

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    cfg, model, step_loss = build(spec["impl"], spec["model"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    model.to(device=device, dtype=dtype).train()
    if spec["compile"]:
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch, seq = spec["batch"], spec["seq"]
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)

    def step():
        loss = step_loss(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    timed_ms(step, spec["warmup"], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_ms = timed_ms(step, spec["steps"], device)
    return {"step_ms": step_ms, "tokens_per_s": batch * seq / (step_ms / 1000),
            "peak_gib": peak_memory_bytes(device) / 2**30, "flops_per_token": _flops(cfg, seq)}


def _flops(cfg, seq: int) -> float:
    import torch

    from curvtrain.models.llama import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(cfg).flops_per_token(seq)


def measure_curvtrain(spec: dict) -> dict:
    """The same model through `pretrain`: a Ray worker running a DeepSpeed engine (ZeRO 0, 1 worker)."""
    from curvtrain.distributed.config import TrainConfig
    from curvtrain.distributed.coordinator import Coordinator
    from curvtrain.distributed.metrics import read_metrics
    from curvtrain.launcher.cluster import connect
    from curvtrain.launcher.config import load_config

    steps = spec["warmup"] + spec["steps"]
    cfg = load_config(TrainConfig, None, [
        f"model.name={spec['model']}", f"model.compile={str(spec['compile']).lower()}",
        f"data.seq_len={spec['seq']}", f"batch.global_batch_size={spec['batch']}", f"batch.micro_batch_size={spec['batch']}",
        "engine.zero_stage=0", f"engine.precision={spec['precision']}", "engine.grad_clip=0",
        "workers.num_workers=1", f"workers.use_gpu={str(spec['device'] == 'cuda').lower()}",
        f"workers.cpus_per_worker={spec['threads']}",
        f"schedule.max_steps={steps}", "schedule.warmup_steps=0",
        f"run.eval_interval={steps}", f"run.eval_samples={spec['batch']}", f"run.checkpoint_interval={steps}",
    ])
    connect(None, num_cpus_needed=spec["threads"], num_gpus_needed=1 if spec["device"] == "cuda" else 0)
    with tempfile.TemporaryDirectory() as run_dir:
        Coordinator(cfg, Path(run_dir)).run()
        records = read_metrics(Path(run_dir))
    # steady state: from the end of the warmup steps to the last step, as the plain loop measures
    t0 = records[spec["warmup"] - 1]["elapsed_s"]
    t1 = records[-1]["elapsed_s"]
    seconds = (t1 - t0) / spec["steps"]
    from curvtrain.models.llama import llama_config

    return {"step_ms": 1000 * seconds, "tokens_per_s": spec["batch"] * spec["seq"] / seconds,
            "peak_gib": records[-1]["peak_memory_gib"],  # the worker's (rank 0's) own peak
            "flops_per_token": _flops(llama_config(spec["model"]), spec["seq"])}


def run_one(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    result = measure_curvtrain(spec) if spec["impl"] == "curvtrain" else measure_plain(spec)
    peak = spec["peak_tflops"] * 1e12 if spec["device"] == "cuda" else cpu_peak_flops()
    result["mfu"] = result["flops_per_token"] * result["tokens_per_s"] / peak
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--model", default=None, help="named config (default: 1b on cuda, 20m on cpu)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, nargs="+", default=[256])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--impls", nargs="+", default=["ours", "hf", "curvtrain"])
    p.add_argument("--compile", nargs="+", default=["eager", "compile"])
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration, interleaved (A B A B ...)")
    add_common_args(p, threads_help="torch threads on CPU (a curvtrain worker's cpus_per_worker)")
    args = p.parse_args()
    if run_child(args, run_one):
        return
    cuda = args.device == "cuda"
    model = args.model or ("1b" if cuda else "20m")
    batch = args.batch or (16 if cuda else 8)
    precision = args.precision or ("bf16" if cuda else "fp32")
    specs = [dict(impl=impl, compile=mode == "compile", model=model, batch=batch, seq=seq, device=args.device,
                  precision=precision, steps=args.steps, warmup=args.warmup, threads=args.threads,
                  peak_tflops=args.peak_tflops)
             for seq in args.seq for mode in args.compile for impl in args.impls]
    name = lambda spec: f"{spec['impl']} {'compile' if spec['compile'] else 'eager'} seq {spec['seq']}"  # noqa: E731
    print(f"{model} {precision} batch {batch}; each configuration {args.repeats}x, interleaved; "
          f"median [min–max] over the repeats", flush=True)
    results = run_interleaved(__file__, specs, args.repeats, label=name)
    tokens = {name(spec): Spread(tuple(r["tokens_per_s"] for r in runs)) for spec, runs in zip(specs, results)}
    rows = []
    for spec, runs in zip(specs, results):
        peak, mfu = Spread(tuple(r["peak_gib"] for r in runs)), Spread(tuple(r["mfu"] for r in runs))
        rows.append({**spec, "runs": runs})
        print(f"{name(spec):28s} tok/s {tokens[name(spec)]!s:28s} peak GiB {peak.median:6.2f}  "
              f"MFU {100 * mfu.median:5.1f}%", flush=True)
    print("ratios of medians (claimed only where the spreads do not overlap):")
    for seq in args.seq:
        for mode in args.compile:
            key = lambda impl: f"{impl} {mode} seq {seq}"  # noqa: E731
            for a, b, what in (("ours", "hf", "ours / HF"), ("curvtrain", "ours", "curvtrain path / plain loop")):
                if key(a) in tokens and key(b) in tokens:
                    print(f"  {what:30s} {mode:8s} seq {seq}: {ratio(tokens[key(a)], tokens[key(b)])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
