"""Peak memory, optimizer-state bytes and throughput of GradNormLoRP against its baselines, side by side
in one run, on our LLaMA (one training step = forward, backward, optimizer step on one random batch).

    # GPU: the issue's three checks (weights in pure bf16, as GaLore's 7B recipe)
    python scripts/bench_memory.py --device cuda --model 7b --batch 1 --seq 256
        # target: gradnorm_lorp8bit at r1024 peaks at <= 20 GiB
    python scripts/bench_memory.py --device cuda --model 7b --batch 1 --seq 2048 --checkpointing \
        --memory-cap-gib 24 --optimizers gradnorm_lorp8bit
        # target: fits under a 24 GiB cap (a run that does not fit is reported as OOM)
    python scripts/bench_memory.py --device cuda --model 1b --batch 16 --seq 256 --rank 512 \
        --optimizers adamw gradnorm_lorp8bit
        # targets: tokens/s >= 0.95x AdamW with refreshes amortized at T=200; refresh overhead <= 2%
    # CPU smoke (fp32; galore8bit is skipped: galore-torch calls torch.cuda.synchronize unconditionally)
    python scripts/bench_memory.py --device cpu --model tiny --batch 2 --seq 64 --steps 3 --warmup 1 --update-gap 5

The rows (`--optimizers`, each in its own process for a clean peak):
  adamw              torch AdamW (fused on CUDA), ordinary step
  adamw8bit          bitsandbytes AdamW8bit, ordinary step
  galore8bit         galore-torch GaLoreAdamW8bit, GaLore's per-layer recipe: one optimizer per parameter
                     stepped in its post-accumulate-grad hook, GaLoreAdamW8bit (proj_type "std") on the
                     attention/MLP matrices, bitsandbytes Adam8bit on the rest
  gradnorm_lorp8bit  GradNormLoRP(eight_bit=True) on LLAMA_TARGETS, per-layer (optim.attach_per_layer_step)
  gradnorm_lorp      GradNormLoRP with float32 moments, ordinary step (reference)
  apollo             APOLLO (optim.apollo: rank 256 or --rank, channel-wise factors) on LLAMA_TARGETS, AdamW
                     with 8-bit moments on the rest, per-layer
  apollo_mini        APOLLO-Mini (rank 1, one tensor-wise factor, scale 128), the same otherwise

`--weights int8` stores the LLAMA_TARGETS matrices as INT8 weights (optim.int8: int8 codes + a float32
scale per 256 values, dequantized only while a layer runs, updates written back with stochastic rounding)
after the model is built in --precision; embeddings, head and norms stay in --precision. The issue-18 run:
    python scripts/bench_memory.py --device cpu --model 7b --batch 1 --seq 256 --precision bf16 --checkpointing \
        --steps 2 --warmup 1 --threads 1 --weights int8 --optimizers apollo_mini
        # target: peak RSS <= 12 GiB (GPU row: the same with --device cuda)

Measured per row: peak memory over the whole process (CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS,
imports included), optimizer-state bytes (every tensor in `optimizer.state`, summed over the per-parameter
optimizers; GaLore's basis, kept in a GaLoreProjector object, included), and ms/step and tokens/s over
--steps steps after --warmup steps (the first of which draws the first basis). For the low-rank rows the
steady steps run with the basis refresh switched off and --refresh-steps steps with it forced, so

    amortized_ms = steady_ms + (refresh_ms - steady_ms) / T,    T = --update-gap (the optimizer's own gap),

and the refresh overhead is amortized_ms / steady_ms - 1. State bytes are also given as the reduction vs
AdamW (the measured row, else 2 moments in the weights' dtype); GradNormLoRP's headline is 89.5% at 7B.

Reference numbers, H100, bf16, 7b, 1x256 tokens: peak AdamW 50.27 GiB, bitsandbytes AdamW8bit 38.11 GiB,
galore-torch GaLoreAdamW8bit per-layer r1024 25.35 GiB; galore-torch's full-SVD refresh takes 280 s at 7b,
41.9 s at 1b.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from curvtrain.distributed.host_memory import compact_host_heap  # noqa: E402
from curvtrain.distributed.metrics import peak_memory_bytes  # noqa: E402
from scripts.benchlib import (MemoryPhases, Spread, add_common_args, cuda_available, ratio, run_child,  # noqa: E402
                             run_interleaved, timed_ms)

OPTIMIZERS = ("adamw", "adamw8bit", "galore8bit", "gradnorm_lorp8bit", "gradnorm_lorp", "apollo", "apollo_mini")
INT8_ROWS = ("gradnorm_lorp8bit", "gradnorm_lorp", "apollo", "apollo_mini")
"""The rows whose update writes whole weights through `write_weight_`, which INT8 weights round themselves."""
LR = 1e-4  # the values do not matter here; small enough that bf16 weights stay finite for a few steps
NO_REFRESH = 10**9  # a refresh gap no run reaches: steady steps never refresh the basis


def default_rank(model_name: str) -> int:
    """GaLore's ranks: 1024 at 7b, 512 at 1b; a quarter of the width otherwise."""
    from curvtrain.models.llama import llama_config

    return {"7b": 1024, "1b": 512}.get(model_name, llama_config(model_name).hidden_size // 4)


@dataclass
class Setup:
    """An optimizer row, ready to train."""

    optimizers: list
    """Whose `.state` is counted (one, or one per parameter for GaLore's per-layer recipe)."""
    per_layer: bool
    """Stepped inside backward by hooks: the training step only calls backward."""
    set_gap: Callable[[int], None] | None = None
    """Sets the basis refresh gap of the low-rank rows (1: refresh at the next step)."""


def setup_adamw(model, spec: dict) -> Setup:
    import torch

    return Setup([torch.optim.AdamW(model.parameters(), lr=LR, fused=spec["device"] == "cuda")], per_layer=False)


def setup_adamw8bit(model, spec: dict) -> Setup:
    import bitsandbytes as bnb

    return Setup([bnb.optim.AdamW8bit(model.parameters(), lr=LR)], per_layer=False)


def setup_galore8bit(model, spec: dict) -> Setup:
    """GaLore's torchrun_main.py with --optimizer galore_adamw8bit_per_layer."""
    import bitsandbytes as bnb
    from galore_torch import GaLoreAdamW8bit

    from curvtrain.optim.gradnorm_lorp import LLAMA_TARGETS, LOWRANK_DEFAULTS

    per_param = {}
    for name, p in model.named_parameters():
        if re.search(LLAMA_TARGETS, name):
            group = dict(params=[p], rank=spec["rank"], update_proj_gap=spec["update_gap"],
                         scale=LOWRANK_DEFAULTS["scale"], proj_type="std")
            per_param[p] = GaLoreAdamW8bit([group], lr=LR)
        else:
            per_param[p] = bnb.optim.Adam8bit([p], lr=LR)

    def hook(p):
        per_param[p].step()
        per_param[p].zero_grad(set_to_none=True)

    for p in per_param:
        p.register_post_accumulate_grad_hook(hook)

    def set_gap(gap: int) -> None:
        # The projector copies update_proj_gap at the parameter's first step and reads only its own copy.
        for opt in per_param.values():
            for state in opt.state.values():
                if "projector" in state:
                    state["projector"].update_proj_gap = gap

    return Setup(list(per_param.values()), per_layer=True, set_gap=set_gap)


def setup_gradnorm_lorp(model, spec: dict, eight_bit: bool) -> Setup:
    from curvtrain.optim import GradNormLoRP, attach_per_layer_step
    from curvtrain.optim.gradnorm_lorp import LLAMA_TARGETS, LOWRANK_DEFAULTS, lowrank_param_groups

    groups = lowrank_param_groups(model.named_parameters(), targets=LLAMA_TARGETS, rank=spec["rank"],
                                  update_gap=spec["update_gap"], scale=LOWRANK_DEFAULTS["scale"])
    opt = GradNormLoRP(groups, lr=LR, eight_bit=eight_bit)
    if eight_bit:
        attach_per_layer_step(model, opt)

    def set_gap(gap: int) -> None:
        for group in opt.param_groups:  # the per-layer hooks hold these same group dicts
            if "rank" in group:
                group["update_gap"] = gap

    return Setup([opt], per_layer=eight_bit, set_gap=set_gap)


def apollo_groups(named_params, spec: dict, mini: bool) -> list[dict]:
    """APOLLO(-Mini) param groups on LLAMA_TARGETS (the official recipe's options; --rank for APOLLO)."""
    from curvtrain.optim.apollo import APOLLO_DEFAULTS, APOLLO_MINI_DEFAULTS, apollo_param_groups
    from curvtrain.optim.gradnorm_lorp import LLAMA_TARGETS

    options = dict(APOLLO_MINI_DEFAULTS) if mini else {**APOLLO_DEFAULTS, "rank": spec["rank"]}
    return apollo_param_groups(named_params, targets=LLAMA_TARGETS, **{**options, "update_gap": spec["update_gap"]})


def setup_apollo(model, spec: dict, mini: bool) -> Setup:
    from curvtrain.optim import attach_per_layer_step
    from curvtrain.optim.apollo import Apollo

    opt = Apollo(apollo_groups(model.named_parameters(), spec, mini), lr=LR, eight_bit=True)
    attach_per_layer_step(model, opt)

    def set_gap(gap: int) -> None:  # the projection is drawn at every step; a renewal only changes its seed
        for group in opt.param_groups:
            if "rank" in group:
                group["update_gap"] = gap

    return Setup([opt], per_layer=True, set_gap=set_gap)


SETUPS: dict[str, Callable[..., Setup]] = {
    "adamw": setup_adamw,
    "adamw8bit": setup_adamw8bit,
    "galore8bit": setup_galore8bit,
    "gradnorm_lorp8bit": lambda model, spec: setup_gradnorm_lorp(model, spec, eight_bit=True),
    "gradnorm_lorp": lambda model, spec: setup_gradnorm_lorp(model, spec, eight_bit=False),
    "apollo": lambda model, spec: setup_apollo(model, spec, mini=False),
    "apollo_mini": lambda model, spec: setup_apollo(model, spec, mini=True),
}


def build_model(spec: dict):
    """Our LLaMA materialized on the device in the target dtype (`models.llama.build_llama`): the weights the
    trainer gets for the same seed, and fp32 7b weights (27 GB) never exist; with INT8 weights each projection
    is quantized as soon as it is drawn."""
    import torch

    from curvtrain.models.llama import build_llama, llama_config
    from curvtrain.optim.gradnorm_lorp import LLAMA_TARGETS
    from curvtrain.optim.int8 import Int8Weight, quantize_weights_

    cfg = llama_config(spec["model"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32

    def to_int8(module) -> None:  # as each projection is drawn: the model in `dtype` never exists whole
        if isinstance(module, torch.nn.Linear) and module.out_features != cfg.vocab_size:
            quantize_weights_(module, r"^weight$")

    model = build_llama(cfg, dtype=dtype, device=spec["device"], place=to_int8 if spec["weights"] == "int8" else None)
    if spec["weights"] == "int8":
        int8 = sorted(n for n, p in model.named_parameters() if isinstance(p, Int8Weight))
        assert int8 == sorted(n for n, _ in model.named_parameters() if re.search(LLAMA_TARGETS, n)), "not the targets"
    model.gradient_checkpointing = spec["checkpointing"]
    return model.train()


def weight_bytes(model) -> int:
    """Bytes the weights occupy: an INT8 weight's codes and scales, every other parameter's storage."""
    from curvtrain.optim.int8 import Int8Weight

    return sum(p.codes.nbytes + p.scale.nbytes if isinstance(p, Int8Weight) else p.numel() * p.element_size()
               for p in model.parameters())


def state_bytes(optimizers: list) -> int:
    """Bytes of the tensors in the optimizers' state, each storage counted once."""
    seen, total = set(), 0
    for opt in optimizers:
        for state in opt.state.values():
            for t in _tensors(list(state.values())):
                key = (t.device, t.untyped_storage().data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
    return total


def _tensors(value):
    """The tensors in a state value: itself, those of a list, or an object's attributes (GaLoreProjector)."""
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif hasattr(value, "__dict__"):
        yield from _tensors(list(vars(value).values()))


def state_census(spec: dict) -> dict[str, int]:
    """Optimizer-state bytes of the whole model without holding the model: one real tensor of every
    distinct (shape, projected?) parameter kind is stepped once on spec's device, and its state bytes are
    multiplied by how many such parameters the model has. Exact for state that depends only on shapes."""
    from collections import Counter

    import torch

    from curvtrain.models.llama import LlamaForCausalLM, llama_config
    from curvtrain.optim.apollo import Apollo
    from curvtrain.optim.gradnorm_lorp import LLAMA_TARGETS, GradNormLoRP

    class OneParameter(torch.nn.Module):
        """A module holding one parameter under a LLaMA name, so the optimizer setups treat it as in the model."""

        def __init__(self, name: str, p: torch.nn.Parameter):
            super().__init__()
            self.param_name, self.weight = name, p

        def named_parameters(self, *args, **kwargs):
            yield self.param_name, self.weight

    with torch.device("meta"):
        meta = LlamaForCausalLM(llama_config(spec["model"]))
    kinds = Counter((tuple(p.shape), bool(re.search(LLAMA_TARGETS, n))) for n, p in meta.named_parameters())
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    totals = {}
    for name in spec["optimizers"]:
        totals[name] = 0
        for (shape, target), count in kinds.items():
            p = torch.nn.Parameter(torch.randn(shape, dtype=dtype, device=spec["device"]) * 0.02)
            param_name = "model.layers.0.self_attn.q_proj.weight" if target else "model.embed_tokens.weight"
            if name.startswith("gradnorm_lorp"):  # its group builder wants at least one target in the model
                group = {"params": [p], "rank": spec["rank"]} if target else {"params": [p]}
                optimizers = [GradNormLoRP([group], lr=LR, eight_bit=name == "gradnorm_lorp8bit")]
            elif name.startswith("apollo"):
                group = apollo_groups([(param_name, p)], spec, name == "apollo_mini")[0] if target else {"params": [p]}
                optimizers = [Apollo([group], lr=LR, eight_bit=True)]
            else:
                optimizers = SETUPS[name](OneParameter(param_name, p), spec).optimizers
            p.grad = torch.randn_like(p) * 1e-3
            for opt in optimizers:  # per-layer hooks never fire here: no backward, a direct step
                opt.step()
            totals[name] += state_bytes(optimizers) * count
    return totals


def measure(spec: dict) -> dict:
    import torch

    device = torch.device(spec["device"])
    if device.type == "cuda" and spec["memory_cap_gib"]:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["memory_cap_gib"] * 2**30 / total), device)
    memory = MemoryPhases(device)
    with memory.phase("before the model"):
        torch.manual_seed(0)
    with memory.phase("build"):
        model = build_model(spec)
    setup = SETUPS[spec["optimizer"]](model, spec)
    x = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"] + 1), device=device)

    def step():
        model(x[:, :-1], x[:, 1:]).backward()
        if not setup.per_layer:
            for opt in setup.optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)

    with memory.phase("first steps"):
        timed_ms(step, spec["warmup"], device)  # the first step creates the state and draws the first basis
    if setup.set_gap:
        setup.set_gap(NO_REFRESH)
    with memory.phase("steady steps"):
        steady_ms = timed_ms(step, spec["steps"], device)
    result = {"steady_ms": steady_ms, "refresh_ms": None, "amortized_ms": steady_ms}
    if setup.set_gap:
        setup.set_gap(1)
        with memory.phase("refresh steps"):
            result["refresh_ms"] = timed_ms(step, spec["refresh_steps"], device)
        result["amortized_ms"] = steady_ms + (result["refresh_ms"] - steady_ms) / spec["update_gap"]
        setup.set_gap(spec["update_gap"])
    result["refresh_overhead"] = result["amortized_ms"] / steady_ms - 1
    tokens = spec["batch"] * spec["seq"]
    result["tokens_per_s"] = tokens / (steady_ms / 1000)
    result["amortized_tokens_per_s"] = tokens / (result["amortized_ms"] / 1000)
    result["state_bytes"] = state_bytes(setup.optimizers)
    result["weight_bytes"] = weight_bytes(model)
    result["phase_peak_bytes"], result["phase_end_bytes"] = memory.peak, memory.end
    result["peak_bytes"] = peak_memory_bytes(device)
    return result


def run_one(spec: dict) -> dict:
    import torch

    if spec["device"] == "cpu" and spec["heap"] == "compact" and not compact_host_heap():
        print("warning: not glibc, the host heap keeps the C library's defaults (--heap compact not applied)",
              file=sys.stderr, flush=True)
    torch.set_num_threads(spec["threads"])
    try:
        return measure(spec)
    except RuntimeError as e:  # torch.OutOfMemoryError, or a library's plain RuntimeError saying so
        if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower():
            raise
        return {"oom": True, "peak_bytes": peak_memory_bytes(torch.device(spec["device"]))}


def adamw_state_bytes(spec: dict) -> int:
    """AdamW's two moments in the weights' dtype: the reference when no adamw row was measured."""
    import torch

    from curvtrain.models.llama import LlamaForCausalLM, llama_config

    with torch.device("meta"):
        n = LlamaForCausalLM(llama_config(spec["model"])).num_parameters()
    return 2 * n * (2 if spec["precision"] == "bf16" else 4)


HEADER = (f"{'optimizer':18s} {'peak GiB':>9s} {'state MiB':>10s} {'vs AdamW':>9s} {'ms/step':>9s} {'tok/s':>9s} "
          f"{'refresh ms':>10s} {'amort. ms':>10s} {'amort tok/s':>11s} {'refresh %':>9s} {'x AdamW':>8s}")


def format_row(r: dict, adamw: dict | None, adamw_bytes: int) -> str:
    name = r["optimizer"]
    if r.get("oom"):
        at = f"  (peak {r['peak_bytes'] / 2**30:.2f} GiB when it failed)" if not math.isnan(r["peak_bytes"]) else ""
        return f"{name:18s} {'OOM':>9s}{at}"
    cut = f"{100 * (1 - r['state_bytes'] / adamw_bytes):8.1f}%"
    refresh = f"{r['refresh_ms']:10.1f}" if r["refresh_ms"] is not None else f"{'-':>10s}"
    ratio = f"{r['amortized_tokens_per_s'] / adamw['tokens_per_s']:8.3f}" if adamw else f"{'-':>8s}"
    return (f"{name:18s} {r['peak_bytes'] / 2**30:9.2f} {r['state_bytes'] / 2**20:10.2f} {cut} {r['steady_ms']:9.1f} "
            f"{r['tokens_per_s']:9.0f} {refresh} {r['amortized_ms']:10.1f} {r['amortized_tokens_per_s']:11.0f} "
            f"{100 * r['refresh_overhead']:8.2f}% {ratio}")


def _median_run(runs: list[dict]) -> dict:
    """The run with the median amortized time (its own peak and phases), with all runs kept under "runs"."""
    if any(r.get("oom") for r in runs):
        return {**next(r for r in runs if r.get("oom")), "runs": runs}
    ordered = sorted(runs, key=lambda r: r["amortized_ms"])
    return {**ordered[(len(ordered) - 1) // 2], "runs": runs}


def print_breakdown(r: dict) -> None:
    """Where the bytes of a row go: memory in use at the end of each phase, and each phase's peak above that."""
    gib = lambda b: f"{b / 2**30:6.2f}"  # noqa: E731
    base = r["phase_end_bytes"]["before the model"]
    print(f"  {r['optimizer']}: process before the model {gib(base)} GiB; weights {gib(r['weight_bytes'])} GiB; "
          f"optimizer state {gib(r['state_bytes'])} GiB", flush=True)
    for phase, peak in list(r["phase_peak_bytes"].items())[1:]:
        end = r["phase_end_bytes"][phase]
        print(f"    {phase:18s} peak {gib(peak)}  in use after {gib(end)}  peak above the end of the build "
              f"{gib(peak - r['phase_end_bytes']['build'])} GiB", flush=True)


def print_census(args) -> None:
    cuda = args.device == "cuda"
    model = args.model or ("7b" if cuda else "20m")
    names = [n for n in args.optimizers if cuda or n != "galore8bit"]  # galore-torch's 8-bit path needs CUDA
    spec = dict(device=args.device, model=model, rank=args.rank or default_rank(model), update_gap=args.update_gap,
                precision=args.precision or "bf16", optimizers=names)
    totals = state_census(spec)
    n_params = _num_params(model)
    fp32_adamw = 8 * n_params  # two fp32 moments per parameter: AdamW's state in mixed precision
    print(f"{model} weights {spec['precision']}, rank {spec['rank']}: optimizer-state bytes of the whole model "
          f"({n_params / 1e9:.3f}B parameters); AdamW with fp32 moments = {fp32_adamw / 2**30:.2f} GiB")
    print(f"{'optimizer':18s} {'state GiB':>10s} {'vs AdamW (same run)':>20s} {'vs AdamW fp32 moments':>22s}")
    for name, total in totals.items():
        same = f"{100 * (total / totals['adamw'] - 1):+.1f}%" if "adamw" in totals else "—"
        print(f"{name:18s} {total / 2**30:10.2f} {same:>20s} {100 * (total / fp32_adamw - 1):+21.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "state_bytes": totals, "params": n_params}, indent=1))


def _num_params(model_name: str) -> int:
    import torch

    from curvtrain.models.llama import LlamaForCausalLM, llama_config

    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(model_name)).num_parameters()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--model", default=None, help="named config (default: 7b on cuda, 20m on cpu)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=None, help="default: 1024 at 7b, 512 at 1b, hidden_size/4 otherwise")
    p.add_argument("--update-gap", type=int, default=200, help="T: steps between basis refreshes, for the amortization")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="runs of each row, interleaved (A B A B ...); speeds as medians")
    p.add_argument("--refresh-steps", type=int, default=1, help="forced refresh steps timed (each is one refresh)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--memory-cap-gib", type=float, default=None, help="CUDA: cap the process's memory; OOM if over")
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--weights", choices=("dense", "int8"), default="dense",
                   help="int8: the attention/MLP matrices as INT8 weights (optim.int8); dense: all in --precision")
    p.add_argument("--heap", choices=("compact", "glibc"), default="compact",
                   help="CPU: compact = a fixed 1 MiB mmap threshold and 2 arenas (distributed.host_memory); "
                        "glibc = the C library's defaults")
    p.add_argument("--state-only", action="store_true",
                   help="only the optimizer-state bytes of the whole model, measured per parameter kind (state_census)")
    add_common_args(p, threads_help="torch threads on CPU")
    args = p.parse_args()
    if run_child(args, run_one):
        return
    if args.state_only:
        print_census(args)
        return
    if min(args.warmup, args.steps, args.refresh_steps, args.update_gap) < 1:
        p.error("--warmup, --steps, --refresh-steps and --update-gap must be >= 1 (warmup draws the first basis)")
    if args.weights == "int8" and set(args.optimizers) - set(INT8_ROWS):
        p.error(f"--weights int8 runs the rows that write through optim.rounding.write_weight_: {', '.join(INT8_ROWS)}")
    cuda = args.device == "cuda"
    model = args.model or ("7b" if cuda else "20m")
    base = dict(device=args.device, model=model, batch=args.batch, seq=args.seq, rank=args.rank or default_rank(model),
                update_gap=args.update_gap, steps=args.steps, warmup=args.warmup, refresh_steps=args.refresh_steps,
                precision=args.precision or ("bf16" if cuda else "fp32"), checkpointing=args.checkpointing,
                memory_cap_gib=args.memory_cap_gib if cuda else None, threads=args.threads, heap=args.heap,
                weights=args.weights)
    print(f"{model} {base['precision']}{' INT8 matrices' if args.weights == 'int8' else ''} {args.batch}x{args.seq} "
          f"rank {base['rank']} T {args.update_gap}"
          f"{' checkpointing' if args.checkpointing else ''}"
          f"{f' cap {args.memory_cap_gib} GiB' if base['memory_cap_gib'] else ''}"
          f"{'' if cuda else f'; host heap {args.heap}'}; peak = "
          f"{'torch.cuda.max_memory_allocated' if cuda else 'peak RSS of the process'}", flush=True)
    print(HEADER, flush=True)
    names = [n for n in OPTIMIZERS if n in args.optimizers and (cuda or n != "galore8bit")]
    if "galore8bit" in args.optimizers and not cuda:
        print("galore8bit skipped on CPU (galore-torch calls torch.cuda.synchronize in every step)", flush=True)
    specs = [{**base, "optimizer": name} for name in names]  # adamw first: the reference of later rows
    results = run_interleaved(__file__, specs, args.repeats, label=lambda spec: spec["optimizer"])
    rows = [{**spec, **_median_run(runs)} for spec, runs in zip(specs, results)]
    adamw = next((r for r in rows if r["optimizer"] == "adamw" and not r.get("oom")), None)
    adamw_bytes = adamw["state_bytes"] if adamw else adamw_state_bytes(base)
    for r in rows:
        print(format_row(r, adamw, adamw_bytes), flush=True)
    if adamw is None:
        print(f"vs AdamW: against AdamW's two moments in {base['precision']} ({adamw_bytes / 2**20:.2f} MiB), not measured")
    elif args.repeats > 1:
        print(f"amortized tokens/s, median [min–max] of {args.repeats} interleaved runs; ratio to AdamW's tokens/s "
              f"claimed only where the spreads do not overlap:")
        reference = Spread(tuple(r["tokens_per_s"] for r in adamw["runs"]))
        for r in rows:
            if not r.get("oom") and r is not adamw:
                mine = Spread(tuple(run["amortized_tokens_per_s"] for run in r["runs"]))
                print(f"  {r['optimizer']:18s} {mine!s:28s} vs AdamW {reference}: {ratio(mine, reference)}", flush=True)
    print("where the bytes go (GiB; in use = resident set on CPU, allocated on CUDA):")
    for r in rows:
        if not r.get("oom"):
            print_breakdown(r)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
