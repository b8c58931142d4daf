"""A checkpoint resumes at another worker count and continues the same training (issue 17).

The data order is a function of (seed, step, global batch) only, so 1 worker × accumulation 2 reads what
2 workers read: a run trained by 2 workers to step 10 and resumed by 1 to step 20 must give the losses of
the uninterrupted 2-worker run, up to the order of float reductions. Real Ray, DeepSpeed and gloo groups.
"""
import pytest

from conftest import resume_from_step_10, tiny
from curvtrain.distributed.metrics import read_metrics

pytestmark = pytest.mark.slow

GN = ("optimizer.name=gradnorm_lorp", "engine.zero_stage=0", "optimizer.lowrank.rank=8",
      "optimizer.lowrank.update_gap=5", "optimizer.lr=0.01")
CASES = {
    # the ZeRO path: flat partitions per rank, converted through DeepSpeed's universal checkpoint
    "adamw_zero1": ("engine.zero_stage=1",),
    "adamw_zero3": ("engine.zero_stage=3",),
    # the owner path: state by parameter name, loaded under the new ownership plan
    "gradnorm_lorp": GN,
    "sophia": ("engine.zero_stage=0", "optimizer.name=sophia", "optimizer.sophia.every=3", "optimizer.lr=2e-3"),
}


def records(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir)}


def assert_same_training(full, resumed, tol: float) -> None:
    a, b = records(full), records(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 21))  # every step logged once
    for step in range(11, 21):
        assert abs(a[step]["loss"] - b[step]["loss"]) <= tol, (step, a[step]["loss"], b[step]["loss"])
    assert abs(a[20]["val_loss"] - b[20]["val_loss"]) <= tol


@pytest.mark.parametrize("name", CASES)
def test_two_workers_resumed_by_one_continue_the_same_training(runs, tmp_path, name):
    full = runs(*CASES[name])  # 2 workers (configs/tiny.yaml)
    resumed = resume_from_step_10(full, tmp_path / "resumed", *CASES[name], "workers.num_workers=1")
    assert tiny(*CASES[name], "workers.num_workers=1").grad_accum == 2 * tiny(*CASES[name]).grad_accum
    assert_same_training(full, resumed, tol=1e-6)  # a sum of two float32 terms does not depend on their order


def test_one_worker_resumed_by_three_continues_the_same_training(runs, tmp_path):
    """12 sequences per step: 1 worker × accumulation 3, then 3 workers × 1. A sum of three float32 partial
    gradients depends on its order, and Adam's normalization amplifies the rounding step by step."""
    geometry = ("batch.global_batch_size=12", "run.eval_samples=12")  # the same held-out sequences at 1 and 3 workers
    full = runs(*GN, *geometry, "workers.num_workers=1")
    resumed = resume_from_step_10(full, tmp_path / "resumed", *GN, *geometry, "workers.num_workers=3")
    assert_same_training(full, resumed, tol=1e-3)
