"""Start-up and restart time of a 2-worker group: curvtrain's coordinator against Ray Train V2's elastic
mode (`ScalingConfig(num_workers=(1, 2))`, `FailureConfig(max_failures=2)`, RAY_TRAIN_V2_ENABLED=1), on a
local Ray runtime, each measurement in a fresh process (its own runtime, started before the clock runs).

    python scripts/bench_elastic.py --repeats 3

Bodies (what each worker runs):
  tiny       the same curvtrain `Trainer` (configs/tiny.yaml at ZeRO 0, 15 steps, a checkpoint each 5) under
             both: our `Coordinator`, or a TorchTrainer whose train loop builds the Trainer on the gloo
             group Ray Train formed and resumes RUN_DIR's last checkpoint. Start-up: from run()/fit() to
             the first step's record in metrics.jsonl. Restart: rank 1's process is killed (SIGKILL) once
             the step-5 checkpoint is sealed; from the kill to the record of step 6 written again.
  gloo loop  Ray Train V2's floor: a loop of 1-element gloo all-reduces (0.1 s apart); rank 1 kills itself
             at step 5 of the first attempt. Start-up: fit() to the first all-reduce on rank 0; restart:
             kill to the first all-reduce of the second attempt.
  group      our floor: `WorkerGroup.start` (placement group + actors) until every actor answers and rank 0
             holds its rendezvous store; restart: shutdown and the same again.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, Spread, run_child, run_interleaved  # noqa: E402

os.environ["RAY_TRAIN_V2_ENABLED"] = "1"  # before ray.train is imported, in the children too
SPECS = [{"system": "curvtrain", "body": "tiny"}, {"system": "ray_train_v2", "body": "tiny"},
         {"system": "curvtrain", "body": "group"}, {"system": "ray_train_v2", "body": "gloo loop"}]
TINY = ["engine.zero_stage=0", "schedule.max_steps=15", "run.checkpoint_interval=5", "run.eval_interval=15"]
KILL_AFTER = 5  # the sealed checkpoint after which rank 1 is killed


class MetricsWatch:
    """Polls RUN_DIR/metrics.jsonl every 10 ms: when its first record appeared, and when, after rank 1 was
    killed, the new group (rank 1's pid, read by `pid`, has changed) wrote step KILL_AFTER + 1 as its first
    record. (The dying group may still log a step after the kill; the new one's record comes after it.)"""

    def __init__(self, run_dir: Path, pid):
        self.path, self.pid = run_dir / "metrics.jsonl", pid
        self.first = self.killed = self.killed_pid = self.again = None
        self.stop = False
        threading.Thread(target=self.poll, daemon=True).start()

    def new_group(self) -> bool:
        try:
            return self.pid() != self.killed_pid
        except (OSError, ValueError, IndexError):  # a file being rewritten
            return False

    def poll(self) -> None:
        seen_at_regroup = None
        while not self.stop and self.again is None:
            now = time.perf_counter()
            text = self.path.read_text() if self.path.is_file() else ""
            lines = [json.loads(ln) for ln in text[:text.rfind("\n") + 1].splitlines() if ln.strip()]
            steps = [r["step"] for r in lines if "event" not in r]
            if steps and self.first is None:
                self.first = now
            if self.killed is not None:
                if seen_at_regroup is None and self.new_group():
                    seen_at_regroup = text
                elif seen_at_regroup is not None and text != seen_at_regroup and steps and steps[-1] == KILL_AFTER + 1:
                    self.again = now
            time.sleep(0.01)


def kill_rank1_once_sealed(run_dir: Path, watch: MetricsWatch) -> None:
    """SIGKILL rank 1 once RUN_DIR's step-KILL_AFTER checkpoint is sealed."""
    latest = run_dir / "checkpoints" / "LATEST"
    while not (latest.is_file() and latest.read_text().strip() == f"step_{KILL_AFTER:08d}"):
        time.sleep(0.01)
    watch.killed_pid = watch.pid()
    os.kill(watch.killed_pid, signal.SIGKILL)
    watch.killed = time.perf_counter()


def tiny_config():
    from curvtrain.distributed.config import TrainConfig
    from curvtrain.launcher.config import load_config

    return load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", TINY)


def ray_train_tiny_loop(config: dict) -> None:
    """A Ray Train worker running curvtrain's Trainer on the process group Ray Train formed."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import torch

    from curvtrain.distributed import checkpoint
    from curvtrain.distributed.coordinator import elastic_size
    from curvtrain.distributed.metrics import truncate_metrics
    from curvtrain.distributed.trainer import Trainer

    run_dir, context = Path(config["run_dir"]), ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    (run_dir / f"pid_rank{rank}").write_text(str(os.getpid()))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")  # adopts Ray Train's group
    cfg = elastic_size(config["cfg"], world)  # the group Ray Train's elastic policy gave
    latest = checkpoint.latest(run_dir / "checkpoints")
    if rank == 0:
        truncate_metrics(run_dir, checkpoint.step_of(latest) if latest else 0)
    trainer = Trainer(cfg, run_dir, torch.device("cpu"), config["owners"])
    if latest is not None:
        trainer.load_checkpoint(latest)
    trainer.fit()


def gloo_loop(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    run_dir, rank = Path(config["run_dir"]), ray.train.get_context().get_world_rank()
    first_attempt = not (run_dir / "started").exists()
    dist.barrier()
    if rank == 0:
        (run_dir / "started").write_text("")
    for step in range(1, 11):
        dist.all_reduce(torch.ones(1))
        if rank == 0:
            with open(run_dir / "steps", "a") as f:
                f.write(f"{time.time()} {step}\n")
        if rank == 1 and step == KILL_AFTER and first_attempt:
            (run_dir / "killed").write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.1)


def trainer_for(loop, config: dict, run_dir: Path):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(loop, train_loop_config=config, torch_config=TorchConfig(backend="gloo"),
                        scaling_config=ScalingConfig(num_workers=(1, 2), use_gpu=False, resources_per_worker={"CPU": 1}),
                        run_config=RunConfig(storage_path=str(run_dir / "ray_train"), name="bench",
                                             failure_config=FailureConfig(max_failures=2)))


def one(spec: dict) -> dict:
    from curvtrain.launcher.cluster import connect

    connect(None, num_cpus_needed=2)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-elastic-"))
    try:
        return measure(spec["system"], spec["body"], run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def measure(system: str, body: str, run_dir: Path) -> dict:
    from curvtrain.distributed.coordinator import Coordinator, WorkerGroup
    from curvtrain.distributed.metrics import read_metrics

    if body == "group":
        import ray

        cfg, times = tiny_config(), []
        for _ in range(2):
            start = time.perf_counter()
            group = WorkerGroup.start(cfg, local=True)
            group.describe()
            ray.get(group.workers[0].rendezvous_address.remote(True))
            times.append(time.perf_counter() - start)
            group.shutdown()
        return {"startup_s": times[0], "restart_s": times[1]}
    if body == "gloo loop":
        start = time.perf_counter()
        wall = time.time()
        trainer_for(gloo_loop, {"run_dir": str(run_dir)}, run_dir).fit()
        steps = [(float(t), int(s)) for t, s in (ln.split() for ln in (run_dir / "steps").read_text().splitlines())]
        killed = float((run_dir / "killed").read_text())
        again = min(t for t, s in steps if s == 1 and t > killed)
        return {"startup_s": steps[0][0] - wall, "restart_s": again - killed, "total_s": time.perf_counter() - start}
    cfg = tiny_config()
    coordinator = Coordinator(cfg, run_dir)
    coordinator.check()  # both: the corpus cached, the ownership plan made
    if system == "curvtrain":
        pid = lambda: json.loads((run_dir / "workers.json").read_text())["pids"][1]  # noqa: E731
        run = coordinator.run
    else:
        pid = lambda: int((run_dir / "pid_rank1").read_text())  # noqa: E731
        run = trainer_for(ray_train_tiny_loop, {"run_dir": str(run_dir), "cfg": cfg, "owners": coordinator.owners}, run_dir).fit
    watch = MetricsWatch(run_dir, pid)
    threading.Thread(target=kill_rank1_once_sealed, args=(run_dir, watch), daemon=True).start()
    start = time.perf_counter()
    run()
    total = time.perf_counter() - start
    time.sleep(0.1)
    watch.stop = True
    steps = [r["step"] for r in read_metrics(run_dir) if "event" not in r]
    assert steps == list(range(1, 16)), steps  # every step once
    assert watch.again is not None, "the restarted group's first step was not seen"
    return {"startup_s": watch.first - start, "restart_s": watch.again - watch.killed, "total_s": total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if run_child(args, one):
        return
    results = run_interleaved(__file__, SPECS, args.repeats, label=lambda s: f"{s['system']} {s['body']}")
    print(f"| system | body | start-up s | restart s | run s |  ({args.repeats} repeats, median [min–max])")
    print("|---|---|---|---|---|")
    for spec, runs in zip(SPECS, results):
        cells = [str(Spread(tuple(r[k] for r in runs))) if k in runs[0] else "—" for k in ("startup_s", "restart_s", "total_s")]
        print(f"| {spec['system']} | {spec['body']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
