"""A run that diverges, races another for its run directory, is interrupted or resumed with other
settings: `curvtrain` as a user runs it (a subprocess, a fresh local Ray runtime, real DeepSpeed)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import CONFIG
from test_cli import ROOT, curvtrain, snapshot
from curvtrain.distributed import checkpoint, run_lock
from curvtrain.distributed.export import consolidated_state_dict

pytestmark = pytest.mark.slow


def strict_json(line: str):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(line, parse_constant=refuse)


def all_finite(ckpt: Path) -> bool:
    return all(torch.isfinite(t).all() for t in consolidated_state_dict(ckpt).values())


@pytest.mark.parametrize("stage, interval, overrides, message", [
    # ZeRO 0 applies every step: at this rate the weights go non-finite in step 4, the loss is NaN at step 5;
    # checked at every log step (the loss) and before each checkpoint is sealed (the weights too)
    (0, 3, (), "the loss or gradient norm is not finite (NaN or inf) at step 5"),
    (0, 2, (), "the weights are not finite (NaN or inf) after step 4"),
    # ZeRO 1 skips each step whose gradients overflow: the weights stay finite but stop training
    (1, 2, ("run.max_skipped_steps=2",), "DeepSpeed has skipped 3 of"),
])
def test_divergence_stops_the_run_and_seals_nothing_non_finite(tmp_path, stage, interval, overrides, message):
    run_dir = tmp_path / "run"
    args = ["--set", f"engine.zero_stage={stage}", "--set", "optimizer.lr=1e4", "--set", "schedule.max_steps=12",
            "--set", f"run.checkpoint_interval={interval}", *(a for o in overrides for a in ("--set", o))]
    result = curvtrain("pretrain", "--config", str(CONFIG), "--out", str(run_dir), *args)
    assert result.returncode == 1, result.stderr[-3000:]
    assert message in result.stderr and "the run diverged" in result.stderr
    assert "Traceback" not in result.stderr and "done:" not in result.stdout
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [strict_json(line) for line in lines]  # valid JSON: a NaN loss is null
    stopped = records[-1]["step"]
    assert [r["step"] for r in records] == list(range(1, stopped + 1)) and stopped < 12
    assert f"step {stopped}" in result.stderr
    if "loss" in message:
        assert records[-1]["loss"] is None
    if stage == 1:
        assert records[-1]["skipped_steps"] == 3 and all(r["loss"] is not None for r in records)
    kept = checkpoint.latest(run_dir / "checkpoints")
    assert kept is not None and checkpoint.step_of(kept) < stopped
    assert f"keeps its last sealed checkpoint {kept.name}" in result.stderr
    for ckpt in (run_dir / "checkpoints").glob("step_*"):  # every sealed checkpoint holds finite weights
        checkpoint.validate(ckpt)
        assert all_finite(ckpt), ckpt
    assert not (run_dir / run_lock.LOCK).exists()  # released on failure


def test_export_refuses_non_finite_weights(runs, tmp_path):
    """A checkpoint whose weights hold a NaN (sealed by an older version, or edited): export names the
    tensor, exit 2, writes nothing."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs("engine.zero_stage=0"), run_dir)
    ckpt = checkpoint.latest(run_dir / "checkpoints")
    states = ckpt / "mp_rank_00_model_states.pt"
    with checkpoint.weights_only_loading():
        state = torch.load(states, weights_only=True)
    state["module"]["model.norm.weight"][3] = float("nan")
    torch.save(state, states)
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    (ckpt / checkpoint.MANIFEST).unlink()
    checkpoint.write_manifest(ckpt, [], **{k: v for k, v in manifest.items() if k != "files"})  # re-sealed as it was
    result = curvtrain("export", str(run_dir), str(tmp_path / "hf"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "non-finite weights" in result.stderr and "model.norm.weight (1 of " in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=1e-3", "trained with optimizer.lr=0.003, this run has optimizer.lr=0.001"),
    ("optimizer.name=sgd", "trained with optimizer.name='adamw', this run has optimizer.name='sgd'"),
])
def test_resume_with_other_optimizer_settings_is_refused_before_ray_starts(runs, tmp_path, override, message):
    """Before: a worker's "different number of parameter groups" (sgd), or the old rate silently kept (lr)."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs("engine.zero_stage=1"), run_dir)
    before = snapshot(run_dir)
    result = curvtrain("pretrain", "--config", str(CONFIG), "--out", str(run_dir), "--resume",
                       "--set", "schedule.max_steps=22", "--set", override)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "Token authentication" not in result.stderr  # refused before Ray started
    assert snapshot(run_dir) == before


def wait_for(predicate, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(") ")[1][0] != "Z"


def test_live_run_holds_its_directory_and_ctrl_c_leaves_it_resumable(tmp_path):
    """A live run holds RUN_DIR: a second run or a --resume of it is refused (exit 2, the holder named)
    and changes nothing. Ctrl-C (SIGINT to the driver) stops the workers and exits 130 naming the sealed
    checkpoint --resume continues from; --resume then finishes the run."""
    run_dir = tmp_path / "run"
    args = ["pretrain", "--config", str(CONFIG), "--out", str(run_dir), "--set", "schedule.max_steps=400",
            "--set", "run.checkpoint_interval=3"]
    live = subprocess.Popen([sys.executable, "-m", "curvtrain.launcher", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: checkpoint.latest(run_dir / "checkpoints") is not None, "the first sealed checkpoint")
        holder = json.loads((run_dir / run_lock.LOCK).read_text())
        assert holder["pid"] == live.pid and holder["host"]
        for extra in ([], ["--resume"]):
            second = curvtrain(*args, *extra, "--set", "schedule.max_steps=404")
            assert second.returncode == 2, second.stderr[-3000:]
            assert f"is in use by another run: pid {live.pid} on host {holder['host']}" in second.stderr
            assert "Traceback" not in second.stderr
        assert live.poll() is None  # the live run goes on, its checkpoints untouched
        steps = [strict_json(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) < 400
        workers = json.loads((run_dir / "workers.json").read_text())["pids"]
        live.send_signal(signal.SIGINT)
        _, err = live.communicate(timeout=120)
    finally:
        if live.poll() is None:
            live.kill()
    assert live.returncode == 130, err[-3000:]
    kept = checkpoint.latest(run_dir / "checkpoints")
    assert f"interrupted; the workers are stopped. {run_dir} keeps its last sealed checkpoint {kept.name}" in err
    assert "continue it with --resume" in err and "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not any(alive(pid) for pid in workers)
    assert not (run_dir / run_lock.LOCK).exists()

    stop = checkpoint.step_of(kept) + 2  # schedule.max_steps may change on resume
    resumed = curvtrain(*args, "--resume", "--set", f"schedule.max_steps={stop}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [strict_json(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, stop + 1))


def test_federate_refuses_a_run_directory_another_process_holds(tmp_path):
    run_dir = tmp_path / "fed"
    with run_lock.hold(run_dir):
        result = curvtrain("federate", "--config", str(ROOT / "configs" / "fed-smoke.yaml"), "--out", str(run_dir))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"is in use by another run: pid {os.getpid()}" in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists()  # the holder created it and left nothing: released, removed
