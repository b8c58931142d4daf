"""`pretrain` end to end on a local Ray runtime: 2 gloo worker processes running real DeepSpeed engines
on the tiny LLaMA and the Wikipedia sample. Runs are cached per configuration for the session
(conftest `runs`), so each test compares against runs other tests also use."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from conftest import resume_from_step_10, losses, tiny
from curvtrain.distributed import checkpoint
from curvtrain.distributed.coordinator import Coordinator
from curvtrain.distributed.metrics import read_metrics

pytestmark = pytest.mark.slow


TWO_WORKERS = {stage: (f"engine.zero_stage={stage}",) for stage in (0, 1, 2, 3)}
ONE_WORKER = ("engine.zero_stage=0", "workers.num_workers=1")  # same global batch: 1 × 4 × accum 2


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_tiny_on_two_workers(runs, stage):
    run_dir = runs(*TWO_WORKERS[stage])
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 21))
    loss = losses(run_dir)
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 1.0, loss  # from ~ln(32000) = 10.4 down
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    assert (run_dir / "loss.png").stat().st_size > 10_000
    assert checkpoint.latest(run_dir / "checkpoints").name == "step_00000020"
    checkpoint.validate(run_dir / "checkpoints" / "step_00000020")


def test_bf16_trains(runs):
    loss = losses(runs("engine.zero_stage=2", "engine.precision=bf16"))
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 1.0, loss


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_one_worker_equals_two_workers(runs, stage):
    one, two = losses(runs(*ONE_WORKER)), losses(runs(*TWO_WORKERS[stage]))
    assert len(one) == len(two) == 20
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)


def tensorboard_steps(run_dir, tag: str) -> list[int]:
    """The steps of scalar `tag` as TensorBoard shows them (all event files of the run, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_resume_equals_uninterrupted(runs, tmp_path):
    full = runs(*TWO_WORKERS[1])
    resumed = resume_from_step_10(full, tmp_path / "resumed", *TWO_WORKERS[1])
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 21))
    assert tensorboard_steps(resumed, "loss") == list(range(1, 21))  # steps 11-20 once, not twice
    a, b = losses(full), losses(resumed)
    assert max(abs(x - y) for x, y in zip(a[10:], b[10:])) <= 1e-6, (a, b)


def test_killed_worker_restarts_from_last_checkpoint(runs, tmp_path):
    reference = losses(runs(*TWO_WORKERS[1]))
    run_dir = tmp_path / "killed"
    killed: list[int] = []

    def kill_rank1_after_step(step: int) -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
            if records and records[-1]["step"] >= step:
                pid = json.loads((run_dir / "workers.json").read_text())["pids"][1]
                os.kill(pid, signal.SIGKILL)
                killed.append(records[-1]["step"])
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_rank1_after_step, args=(6,))
    killer.start()
    # Checkpoints every 5 steps (saving changes no state, so the losses must match the reference run).
    summary = Coordinator(tiny(*TWO_WORKERS[1], "run.checkpoint_interval=5"), run_dir).run()
    killer.join()
    assert killed and killed[0] < 20, "the run finished before the worker could be killed"
    assert json.loads((run_dir / "workers.json").read_text())["attempt"] == 1  # restarted once
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 21))  # nothing lost, nothing duplicated
    assert max(abs(a - b) for a, b in zip(reference, losses(run_dir))) <= 1e-6
    assert summary["step"] == 20


def test_rendezvous_port_is_held_until_the_group_forms(ray_runtime):
    """Rank 0's TCP store listens on its port from the moment the address is handed out, so no other
    process (another run's rendezvous included) can bind it in between; two groups get two ports."""
    import errno
    import socket

    import ray

    from curvtrain.distributed.worker import TrainWorker

    actors = [TrainWorker.options(num_cpus=0.1).remote(0, 2, False, 1) for _ in range(2)]
    try:
        addresses = ray.get([a.rendezvous_address.remote(True) for a in actors])
        assert addresses[0][1] != addresses[1][1]
        for host, port in addresses:
            with socket.socket() as s, pytest.raises(OSError) as taken:
                s.bind((host, port))
            assert taken.value.errno == errno.EADDRINUSE
    finally:
        for a in actors:
            ray.kill(a)


def test_weights_and_biases_offline_run(ray_runtime, tmp_path):
    """run.wandb.project in offline mode: rank 0's W&B run lands in RUN_DIR/wandb and holds the losses of
    metrics.jsonl (these machines reach no W&B server). wandb 0.2x+ has no Python reader of its .wandb files;
    the history values are stored as JSON text in them (a file this small is one LevelDB-log block, so no
    record is split), which is what this test looks for."""
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'curvtrain[wandb]')")
    run_dir = tmp_path / "tracked"
    Coordinator(tiny("run.wandb.project=curvtrain-tests", "run.wandb.mode=offline", "schedule.max_steps=4",
                     "run.eval_interval=4"), run_dir).run()
    [offline] = (run_dir / "wandb").glob("offline-run-*")
    [records] = offline.glob("run-*.wandb")
    data = records.read_bytes()
    assert data.startswith(b":W&B") and len(data) < 32768 and b"curvtrain-tests" in data
    metrics = read_metrics(run_dir)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    for r in metrics:
        assert json.dumps(r["loss"]).encode() in data, r
    assert json.dumps(metrics[-1]["val_loss"]).encode() in data
