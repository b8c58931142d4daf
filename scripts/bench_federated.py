"""Federated benchmarks on Fashion-MNIST (configs/fed-fmnist.yaml: 100 clients, 10% participation, the small
CNN, K local SGD steps per round), all through `curvtrain federate`'s server and actor pool.

    python scripts/bench_federated.py curves --rounds 30 --seeds 0 1 2 --alphas 0.3 0.1 --out docs/federated
    python scripts/bench_federated.py speed  --rounds 8 --json docs/federated_speed.json
    python scripts/bench_federated.py memory --clients 100 1000 --json docs/federated_memory.json

curves: FedAvg, FedProx, SCAFFOLD, FedSpeed with the same rounds, local steps, batch and learning rate,
        at every (Dirichlet α, seed); the seed sets the partition, the initial model and the client sampling.
        Writes OUT.json (every run's accuracy curve; runs already there are reused) and OUT.png (mean curves).
speed:  client updates per second of the actor pool (2 actors × 1 thread) against FL-Simulator's style,
        one process (2 threads) training the sampled clients in a loop with the same local-step code,
        model and data; measured alternately in one run (baseline, pool, baseline).
memory: peak RSS of a SCAFFOLD run's server process with N clients at 1% participation (client states on
        disk, only the round's in memory) against one process that holds FL-Simulator's dense N × d
        tables (last models, last updates, control variates); each in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.benchlib import ROOT, report, run_isolated  # noqa: E402

CONFIG = ROOT / "configs" / "fed-fmnist.yaml"
ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedspeed")


def config(*overrides: str):
    from curvtrain.distributed.federated.config import FederatedConfig
    from curvtrain.launcher.config import load_config

    return load_config(FederatedConfig, CONFIG, list(overrides))


def connect(num_actors: int, model_bytes: int = 4 << 20) -> None:
    from curvtrain.distributed.federated.server import object_store_bytes
    from curvtrain.launcher.cluster import connect as ray_connect

    ray_connect(None, num_cpus_needed=num_actors, object_store_bytes=object_store_bytes(model_bytes, num_actors))


# ---- accuracy curves ----
def curves(args) -> None:
    from curvtrain.distributed.federated.server import FederatedServer
    from curvtrain.distributed.metrics import read_metrics

    out = Path(args.out)
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    connect(2)
    for seed in args.seeds:
        for alpha in args.alphas:
            for name in args.algorithms:
                key = f"{name}/alpha={alpha}/seed={seed}/rounds={args.rounds}"
                if key in results:
                    continue
                cfg = config(f"algorithm.name={name}", f"data.alpha={alpha}", f"data.seed={seed}", f"run.seed={seed}",
                             f"run.rounds={args.rounds}", f"run.eval_interval={args.eval_interval}",
                             f"run.checkpoint_interval={args.rounds}")
                with tempfile.TemporaryDirectory() as tmp:
                    began = time.perf_counter()
                    FederatedServer(cfg, Path(tmp) / "run").run()
                    records = read_metrics(Path(tmp) / "run")
                results[key] = {
                    "algorithm": name, "alpha": alpha, "seed": seed,
                    "rounds": [r["round"] for r in records if "test_accuracy" in r],
                    "accuracy": [r["test_accuracy"] for r in records if "test_accuracy" in r],
                    "test_loss": [r["test_loss"] for r in records if "test_loss" in r],
                    "wall_s": time.perf_counter() - began,
                }
                out.with_suffix(".json").write_text(json.dumps(results, indent=1))
                print(f"{key}: accuracy {results[key]['accuracy'][-1]:.4f} ({results[key]['wall_s']:.0f} s)", flush=True)
    table_and_plot(results, args.rounds, out)


def table_and_plot(results: dict, rounds: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for k, r in results.items() if k.endswith(f"rounds={rounds}")]
    alphas = sorted({r["alpha"] for r in runs}, reverse=True)
    print("| algorithm | " + " | ".join(f"Dir-{a} final acc. (mean ± sd over seeds)" for a in alphas) + " |")
    print("|---|" + "---|" * len(alphas))
    for name in ALGORITHMS:
        cells = []
        for a in alphas:
            finals = [r["accuracy"][-1] * 100 for r in runs if r["algorithm"] == name and r["alpha"] == a]
            sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
            cells.append(f"{statistics.mean(finals):.2f} ± {sd:.2f} (n={len(finals)})" if finals else "—")
        print(f"| {name} | " + " | ".join(cells) + " |")
    fig, axes = plt.subplots(1, len(alphas), figsize=(6 * len(alphas), 4), squeeze=False)
    for ax, a in zip(axes[0], alphas):
        for name in ALGORITHMS:
            mine = [r for r in runs if r["algorithm"] == name and r["alpha"] == a]
            if mine:
                mean = [statistics.mean(v) * 100 for v in zip(*(r["accuracy"] for r in mine))]
                ax.plot(mine[0]["rounds"], mean, "o-", ms=3, label=f"{name} (n={len(mine)})")
        ax.set_title(f"Fashion-MNIST, 100 clients, 10%/round, Dir({a})")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%), mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(out.with_suffix(".png"), dpi=120, bbox_inches="tight")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


# ---- client updates per second ----
def speed(args) -> None:
    import torch

    from curvtrain.distributed.federated.algorithms import mean_of
    from curvtrain.distributed.federated.client import train_client
    from curvtrain.distributed.federated.partition import sample_clients
    from curvtrain.distributed.federated.server import FederatedServer
    from curvtrain.distributed.federated.workload import build_workload
    from curvtrain.distributed.metrics import read_metrics
    from curvtrain.optim import build_optimizer

    overrides = ["algorithm.name=fedavg", f"run.rounds={args.rounds}", f"run.eval_interval={args.rounds}",
                 f"run.checkpoint_interval={args.rounds}", "run.eval_samples=1000", "pool.num_actors=2"]
    cfg = config(*overrides)

    def single_process() -> float:
        """FL-Simulator's style: one process, all threads, the sampled clients trained one after another."""
        torch.set_num_threads(2)
        workload = build_workload(cfg)
        torch.manual_seed(0)
        model, algorithm = workload.build_model(), cfg.algorithm.build()
        x = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        updates, seconds = 0, 0.0
        for t in range(args.rounds):
            began = time.perf_counter()
            uploads = []
            for c in sample_clients(cfg.clients.num_clients, cfg.clients.per_round, cfg.run.seed, t):
                opt = build_optimizer(cfg.local.optimizer, model.named_parameters())
                res = train_client(model, algorithm, opt, workload.client_batches(c, t), workload.loss, start=x,
                                   server_state={}, client_state={}, lr=cfg.local.optimizer.lr, steps=cfg.local.steps,
                                   grad_clip=cfg.local.grad_clip)
                uploads.append(res.upload)
            x, _ = algorithm.server_update(x, {}, mean_of(uploads), len(uploads) / cfg.clients.num_clients)
            if t > 0:  # as for the pool, the first round is left out
                updates, seconds = updates + len(uploads), seconds + time.perf_counter() - began
        return updates / seconds

    def pool() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            FederatedServer(cfg, Path(tmp) / "run").run()
            records = read_metrics(Path(tmp) / "run")[1:]  # round 1 includes the actors' start
        return sum(r["clients"] for r in records) / sum(r["round_s"] - r.get("eval_s", 0) for r in records)

    connect(2)
    base1 = single_process()
    ours = pool()
    base2 = single_process()
    torch.set_num_threads(1)
    result = {"single_process_updates_per_s": [base1, base2], "pool_updates_per_s": ours,
              "ratio": ours / statistics.mean([base1, base2]), "rounds": args.rounds, "local_steps": cfg.local.steps,
              "batch_size": cfg.local.batch_size, "per_round": cfg.clients.per_round}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


# ---- peak memory with many clients ----
def memory_one(spec: dict) -> dict:
    """One child process: `spec` = {"mode": "pool" | "dense", "clients": N, "rounds": R}."""
    import torch

    n, rounds = spec["clients"], spec["rounds"]
    cfg = config("algorithm.name=scaffold", f"clients.num_clients={n}", f"clients.per_round={max(1, n // 100)}",
                 "clients.min_clients=1", f"run.rounds={rounds}", f"run.eval_interval={rounds}", "run.eval_samples=1000",
                 f"run.checkpoint_interval={rounds}", "data.partition=iid", "local.batch_size=10", "pool.num_actors=2")
    if spec["mode"] == "pool":
        from curvtrain.distributed.federated.server import FederatedServer

        connect(2)
        with tempfile.TemporaryDirectory() as tmp:
            server = FederatedServer(cfg, Path(tmp) / "run")
            server.run()
            disk = server.store.disk_bytes()
        dim = server.x.numel()
    else:
        from curvtrain.distributed.federated.algorithms import mean_of
        from curvtrain.distributed.federated.client import train_client
        from curvtrain.distributed.federated.partition import sample_clients
        from curvtrain.distributed.federated.workload import build_workload
        from curvtrain.optim import build_optimizer

        workload = build_workload(cfg)
        torch.manual_seed(0)
        model, algorithm = workload.build_model(), cfg.algorithm.build()
        x = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        dim = x.numel()
        # FL-Simulator's SCAFFOLD server keeps three dense N × d tables: every client's last model
        # (initialized with the model: resident at once), last update and control variate (zeros)
        params_all, updates_all, c_all = x.repeat(n, 1), torch.zeros(n, dim), torch.zeros(n, dim)
        server = {"c": torch.zeros(dim)}
        for t in range(rounds):
            uploads = []
            for i in sample_clients(n, cfg.clients.per_round, cfg.run.seed, t):
                opt = build_optimizer(cfg.local.optimizer, model.named_parameters())
                res = train_client(model, algorithm, opt, workload.client_batches(i, t), workload.loss, start=x,
                                   server_state=server, client_state={"c": c_all[i]}, lr=cfg.local.optimizer.lr,
                                   steps=cfg.local.steps, grad_clip=cfg.local.grad_clip)
                c_all[i], updates_all[i], params_all[i] = res.state["c"], res.upload["delta"], x + res.upload["delta"]
                uploads.append(res.upload)
            x, server = algorithm.server_update(x, server, mean_of(uploads), len(uploads) / n)
        disk = 0
    return {**spec, "parameters": dim, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "state_disk_mib": disk / 2**20}


def memory(args) -> None:
    rows = []
    for n in args.clients:
        for mode in ("dense", "pool"):
            result, err = run_isolated(__file__, {"mode": mode, "clients": n, "rounds": args.rounds, "cmd": "memory"})
            if result is None:
                print(err[-3000:], file=sys.stderr)
                continue
            rows.append(result)
            print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", nargs="?", choices=("curves", "speed", "memory"))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--eval-interval", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.1])
    p.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--out", default="docs/federated")
    p.add_argument("--json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        report(memory_one(json.loads(args.one)))
        return
    {"curves": curves, "speed": speed, "memory": memory}[args.mode](args)


if __name__ == "__main__":
    main()
