"""`curvtrain` command line: pretrain | federate | export | sample.

    curvtrain pretrain [--config configs/X.yaml] [--out RUN_DIR] [--set key=value ...] [--resume] [--address ADDR]
    curvtrain federate --config configs/X.yaml [--out RUN_DIR] [--set key=value ...] [--resume] [--address ADDR]
    curvtrain export RUN_DIR_OR_CHECKPOINT OUT_DIR
    curvtrain sample RUN_DIR_OR_CHECKPOINT_OR_EXPORT --prompt TEXT [--max-new-tokens N] [--top-k K] [--temperature T]

Every config problem is reported, naming the field, before Ray or any worker starts.
Exit codes: 0 done; 2 bad input (config, paths, checkpoint, a run directory another live run holds),
found before any worker starts, nothing written; 1 a failure during the run (the worker's traceback is
printed) or a run that diverged (the step named); 130 interrupted (Ctrl-C). After 1 and 130 the run
directory keeps its last sealed checkpoint, so `--resume` continues it once the cause is fixed.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from curvtrain.launcher.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curvtrain", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    _add_run_parser(sub, "pretrain", "pretrain a LLaMA model on Ray workers running DeepSpeed engines",
                    config_help="YAML config (default: the built-in defaults, a 2-worker CPU run)", example="optimizer.lr=3e-3")
    _add_run_parser(sub, "federate", "simulate federated clients (FedAvg, FedProx, SCAFFOLD, FedSpeed) on a pool of Ray actors",
                    config_help="YAML config, e.g. configs/fed-smoke.yaml", example="algorithm.name=scaffold", required=True)

    exp = sub.add_parser("export", help="write a Hugging Face LlamaForCausalLM folder from a run or checkpoint")
    exp.add_argument("source", help="run directory, its checkpoints/ folder, or one step_* checkpoint")
    exp.add_argument("out_dir", help="folder to create (safetensors + config.json + tokenizer files)")
    _add_sample_parser(sub)
    return p


def _add_run_parser(sub, name: str, help: str, *, config_help: str, example: str, required: bool = False) -> None:
    """The arguments of a run (pretrain, federate): config, overrides, run directory, resume, cluster."""
    run = sub.add_parser(name, help=help)
    run.add_argument("--config", required=required, help=config_help)
    run.add_argument("--out", help="run directory (default: runs/<config>-<time>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help=f"override a config field by its dotted path, e.g. --set {example} (repeatable)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--address", help="an existing Ray cluster (default: start a local runtime)")


def _run_config(cls: type, args):
    """The run's typed config and its run directory (named after the config file and the time unless --out)."""
    cfg = load_config(cls, args.config, args.overrides)
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    stem = Path(args.config).stem if args.config else "default"
    return cfg, Path(args.out or f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def _print_done(headline: str, run_dir: Path, plots: str, ckpt: str) -> None:
    print(
        f"[curvtrain] done: {headline}\n"
        f"  metrics:     {run_dir / 'metrics.jsonl'}\n"
        f"  plot:        {plots}\n"
        f"  checkpoint:  {ckpt}\n"
        f"  tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}"
    )


def _add_sample_parser(sub) -> None:
    smp = sub.add_parser("sample", help="continue a prompt with a trained model (greedy, or top-k sampling)")
    smp.add_argument("source", help="an exported folder (curvtrain export), or a run directory (its last checkpoint), "
                                    "its checkpoints/ folder or one step_* checkpoint")
    smp.add_argument("--prompt", required=True, help="the text to continue")
    smp.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    smp.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 (default): greedy")
    smp.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of top-k sampling")
    smp.add_argument("--seed", type=int, default=0, help="seed of top-k sampling")


def pretrain(args) -> int:
    from curvtrain.distributed.config import TrainConfig

    cfg, run_dir = _run_config(TrainConfig, args)

    def run() -> dict:
        from curvtrain.distributed.coordinator import Coordinator
        from curvtrain.launcher.cluster import connect

        coordinator = Coordinator(cfg, run_dir, resume=args.resume)
        coordinator.check()  # before Ray starts: run dir, checkpoint, corpus
        w = cfg.workers
        coordinator.local = connect(args.address, num_cpus_needed=w.num_workers * w.cpus_per_worker,
                                    num_gpus_needed=w.num_workers if w.use_gpu else 0)
        return coordinator.run()

    summary = run_locked(run, run_dir)
    if isinstance(summary, int):
        return summary
    _print_done(f"step {summary.get('step')}  loss {summary.get('loss', float('nan')):.4f}  "
                f"val_loss {summary.get('val_loss', float('nan')):.4f}", run_dir, summary["plot"], summary["checkpoint"])
    return 0


def federate(args) -> int:
    from curvtrain.distributed.federated.config import FederatedConfig

    cfg, run_dir = _run_config(FederatedConfig, args)

    def run() -> dict:
        from curvtrain.distributed.federated.server import FederatedServer, object_store_bytes
        from curvtrain.launcher.cluster import connect

        server = FederatedServer(cfg, run_dir, resume=args.resume)
        server.check()  # before Ray starts: run dir, checkpoint, data files
        p = cfg.pool
        actors = p.num_actors or None  # None: one per CPU slot of the cluster, known once connected
        connect(args.address, num_cpus_needed=(actors or 1) * p.cpus_per_actor, num_gpus_needed=(actors or 1) if p.use_gpu else 0,
                object_store_bytes=object_store_bytes(server.model_bytes, actors or _local_slots(p)))
        return server.run()

    summary = run_locked(run, run_dir)
    if isinstance(summary, int):
        return summary
    metrics = "  ".join(f"{k} {summary[k]:.4f}" for k in ("test_loss", "test_accuracy") if k in summary)
    _print_done(f"round {summary.get('round')}  {metrics}", run_dir, " ".join(summary["plots"]), summary["checkpoint"])
    return 0


def run_locked(run, run_dir: Path) -> dict | int:
    """`run()`'s summary, run holding RUN_DIR's lock (released on every way out); or, when the run stops
    after its workers started, the exit code after saying why and which sealed checkpoint `--resume`
    continues from: 1 a failure (the workers' traceback) or divergence (the step), 130 Ctrl-C (the
    workers are stopped first). Bad input (exit 2) propagates."""
    from curvtrain.distributed import checkpoint, run_lock
    from curvtrain.distributed.coordinator import RunFailed
    from curvtrain.distributed.health import Diverged

    def kept() -> str:
        found = checkpoint.latest(run_dir / "checkpoints")
        return f"its last sealed checkpoint {found.name}" if found else "no checkpoint yet"

    try:
        with run_lock.hold(run_dir):
            return run()
    except RunFailed as e:
        print(f"curvtrain: the run failed:\n{e}\ncurvtrain: {run_dir} keeps {kept()}; fix the cause, then "
              f"continue it with --resume", file=sys.stderr)
        return 1
    except Diverged as e:
        print(f"curvtrain: {e}\ncurvtrain: {run_dir} keeps {kept()} (no checkpoint of non-finite weights is "
              f"sealed); lower optimizer.lr or raise engine.grad_clip, then continue it with --resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ncurvtrain: interrupted; the workers are stopped. {run_dir} keeps {kept()}"
              f"{'; continue it with --resume' if checkpoint.latest(run_dir / 'checkpoints') else ''}", file=sys.stderr)
        return 130


def _local_slots(pool) -> int:
    import os

    return max(1, (os.cpu_count() or 1) // pool.cpus_per_actor)


def export(args) -> int:
    from curvtrain.distributed import checkpoint
    from curvtrain.distributed.config import TrainConfig
    from curvtrain.distributed.export import export_checkpoint

    ckpt = checkpoint.resolve(Path(args.source))
    cfg = load_config(TrainConfig, ckpt / "config.yaml")
    out = export_checkpoint(ckpt, cfg, Path(args.out_dir))
    print(f"[curvtrain] exported {out} (transformers.LlamaForCausalLM.from_pretrained loads it)")
    return 0


def sample(args) -> int:
    from curvtrain.distributed import checkpoint, sampling
    from curvtrain.distributed.config import TrainConfig

    source = Path(args.source)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the sample alone (DeepSpeed's loader prints)
        if sampling.is_exported(source):
            model, tokenizer = sampling.load_exported(source)
        else:
            ckpt = checkpoint.resolve(source)
            model, tokenizer = sampling.load_checkpoint(ckpt, load_config(TrainConfig, ckpt / "config.yaml"))
    text = sampling.sample(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                           temperature=args.temperature, seed=args.seed)
    print(args.prompt + text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from curvtrain.distributed.checkpoint import CheckpointError

    try:
        return {"pretrain": pretrain, "federate": federate, "export": export, "sample": sample}[args.command](args)
    except (ValueError, CheckpointError, OSError) as e:  # ConfigError, RunDirError, data errors
        print(f"curvtrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any worker started (a run's own Ctrl-C is run_locked's)
        print("\ncurvtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
