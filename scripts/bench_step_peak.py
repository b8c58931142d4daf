"""Peak host memory of one GradNormLoRP 8-bit step of a single tensor of a named model's shapes, above the
resident set before the step: the optimizer's own temporaries, without the model.

    python scripts/bench_step_peak.py --model 7b --kind embed   # 32000x4096, plain 8-bit AdamW moments
    python scripts/bench_step_peak.py --model 7b --kind mlp     # 11008x4096, rank 1024, a refresh every step
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.benchlib import MemoryPhases  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="7b")
    p.add_argument("--kind", choices=["embed", "mlp"], default="embed")
    p.add_argument("--rank", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    import torch

    from curvtrain.models.llama import llama_config
    from curvtrain.optim import GradNormLoRP

    torch.set_num_threads(1)
    cfg = llama_config(args.model)
    shape = (cfg.vocab_size, cfg.hidden_size) if args.kind == "embed" else (cfg.intermediate_size, cfg.hidden_size)
    weight = torch.nn.Parameter((torch.randn(shape) * 0.02).to(torch.bfloat16))
    group = {"params": [weight]} if args.kind == "embed" else {"params": [weight], "rank": args.rank, "update_gap": 1}
    optimizer = GradNormLoRP([group], lr=1e-4, eight_bit=True)
    memory = MemoryPhases(torch.device("cpu"))
    for step in range(1, args.steps + 1):
        weight.grad = (torch.randn(shape) * 1e-3).to(torch.bfloat16)
        with memory.phase("before"):
            pass
        start = time.perf_counter()
        with memory.phase("step"):
            optimizer.step()
        print(f"{args.kind} {shape} bf16, step {step}: resident before {memory.end['before'] / 2**30:.2f} GiB, "
              f"peak above it {(memory.peak['step'] - memory.end['before']) / 2**30:.2f} GiB, "
              f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
