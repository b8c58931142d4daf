"""Sophia, AdaHessian and M-FAC through `pretrain`: real Ray workers, DeepSpeed ZeRO-0 engines, 2-process
gloo groups; curvature estimates reduced to each block's owner, state only on owners."""

import pytest
import torch

from conftest import resume_from_step_10, CONFIG, tiny
from curvtrain.distributed.distributor import OPTIMIZER_SHARD
from curvtrain.distributed.export import consolidated_state_dict
from curvtrain.distributed.metrics import read_metrics
from curvtrain.launcher.config import ConfigError
from test_cli import curvtrain

ZERO0 = ("engine.zero_stage=0",)
ONE, TWO = ("workers.num_workers=1",), ("workers.num_workers=2",)
CASES = {
    # Sophia-G, an estimate every 3 steps on all micro-batches of the step
    "sophia": ("optimizer.name=sophia", "optimizer.sophia.every=3", "optimizer.lr=2e-3"),
    # Sophia-H: Hutchinson estimates (double backward), of either sign, every 3 steps
    "sophia_hutchinson": ("optimizer.name=sophia", "optimizer.sophia.estimator=hutchinson", "optimizer.sophia.every=3",
                          "optimizer.lr=2e-3"),
    # AdaHessian, a Hutchinson estimate (double backward) every step
    "adahessian": ("optimizer.name=adahessian", "optimizer.lr=0.15"),
    # blockwise M-FAC with momentum; blocks of 4096 entries cut the embedding and head into many
    "mfac": ("optimizer.name=mfac", "optimizer.mfac.window=4", "optimizer.mfac.damping=1e-3",
             "optimizer.mfac.momentum=0.5", "optimizer.mfac.block_size=4096", "optimizer.lr=1e-2"),
    # M-FAC with GNS damping: the step re-evaluates the batch through the trainer's closure
    "mfac_gns": ("optimizer.name=mfac", "optimizer.mfac.window=4", "optimizer.mfac.damping=gns",
                 "optimizer.mfac.block_size=4096", "optimizer.lr=1.0", "optimizer.weight_decay=0", "engine.grad_clip=0"),
}


def weights(run_dir, step=20):
    return consolidated_state_dict(run_dir / "checkpoints" / f"step_{step:08d}")


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_workers_equal_one_worker_after_20_steps(runs, name):
    one, two = runs(*ZERO0, *CASES[name], *ONE), runs(*ZERO0, *CASES[name], *TWO)
    assert max_diff(weights(one), weights(two)) <= 1e-5
    records = read_metrics(two)
    assert records[-1]["loss"] < records[0]["loss"] - 1.0  # it trains
    if name.startswith("sophia"):
        assert all(0 < r["win_rate"] < 1 for r in records)
    if name == "mfac_gns":
        assert all(r["gns_gamma"] > 0 for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sophia", "mfac_gns"])  # estimates to uneven owners; the closure's trial points
def test_three_workers_equal_one_worker(runs, name):
    """3 workers, 12 sequences a step (1 worker: accumulation 3): ranks 0 and 1 own only the embedding and
    the head, rank 2 every other block. After 4 steps: a sum of three partial gradients depends on their
    order, and the rounding grows step by step (test_gradnorm_distributed)."""
    short = ("batch.global_batch_size=12", "schedule.max_steps=4", "run.checkpoint_interval=4", "run.eval_interval=4")
    one = runs(*ZERO0, *CASES[name], "workers.num_workers=1", *short)
    three = runs(*ZERO0, *CASES[name], "workers.num_workers=3", *short)
    a, b = weights(one, 4), weights(three, 4)
    if name == "mfac_gns":
        assert max_diff(a, b) <= 1e-5
    else:  # Sophia's clipped update is sign(m) wherever |m| ≥ ρh: a rounding-level change of m near 0 flips it
        diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert diffs.mean() <= 1e-7 and (diffs > 1e-5).double().mean() <= 1e-4, (diffs.mean(), (diffs > 1e-5).sum())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sophia", "sophia_hutchinson", "adahessian", "mfac_gns"])  # h; Adam moments of the estimate; windows and γ
def test_resume_equals_uninterrupted(runs, tmp_path, name):
    overrides = (*ZERO0, *CASES[name], *TWO)
    full = runs(*overrides)
    resumed = resume_from_step_10(full, tmp_path / "resumed", *overrides)
    assert max_diff(weights(full), weights(resumed)) == 0.0
    assert [r["loss"] for r in read_metrics(full)] == [r["loss"] for r in read_metrics(resumed)]


@pytest.mark.slow
def test_finite_difference_estimates_train_like_autograd_ones(runs):
    """AdaHessian with (∇f(θ+εu) − ∇f(θ))/ε Hessian-vector products (no double backward) inside pretrain,
    on two workers: the same Rademacher vectors as the autograd run, so the runs stay close."""
    autograd = read_metrics(runs(*ZERO0, *CASES["adahessian"], *TWO))
    fd_run = runs(*ZERO0, *CASES["adahessian"], *TWO, "optimizer.adahessian.method=finite_difference")
    fd = read_metrics(fd_run)
    assert fd[-1]["loss"] < fd[0]["loss"] - 1.0
    assert abs(fd[-1]["val_loss"] - autograd[-1]["val_loss"]) < 0.02 * autograd[-1]["val_loss"]
    assert max_diff(weights(fd_run), weights(runs(*ZERO0, *CASES["adahessian"], *TWO))) > 0  # a different estimate


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sophia", "adahessian", "mfac"])
def test_bf16_weights_train_like_fp32(runs, name):
    """bf16 weights, no fp32 copy (owner-sharded: updates stochastically rounded into the weights): the
    checkpointed weights are bf16 and the final validation loss is within 2% of the fp32 run's."""
    fp32 = read_metrics(runs(*ZERO0, *CASES[name], *TWO))
    bf16_run = runs(*ZERO0, *CASES[name], *TWO, "engine.precision=bf16")
    bf16 = read_metrics(bf16_run)
    saved = torch.load(bf16_run / "checkpoints" / "step_00000020" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    assert abs(bf16[-1]["val_loss"] - fp32[-1]["val_loss"]) < 0.02 * fp32[-1]["val_loss"]


@pytest.mark.slow
def test_mfac_windows_live_on_their_owners_only(runs):
    """The M-FAC windows (4 × the model) are split between the two workers: each checkpoints about half."""
    one = runs(*ZERO0, *CASES["mfac"], *ONE) / "checkpoints" / "step_00000020"
    two = runs(*ZERO0, *CASES["mfac"], *TWO) / "checkpoints" / "step_00000020"
    total = (one / OPTIMIZER_SHARD.format(0)).stat().st_size
    sizes = [(two / OPTIMIZER_SHARD.format(rank)).stat().st_size for rank in (0, 1)]
    assert all(0.4 * total < size < 0.6 * total for size in sizes), (total, sizes)


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.sophia.every=0"], r"optimizer\.sophia: every must be ≥ 1"),
    (["optimizer.sophia.rho=0"], r"optimizer\.sophia: rho must be > 0"),
    (["optimizer.sophia.estimator=fisher"], r"optimizer\.sophia: estimator must be one of"),
    (["optimizer.adahessian.method=exact"], r"optimizer\.adahessian: method must be one of"),
    (["optimizer.adahessian.hessian_power=2"], r"optimizer\.adahessian: hessian_power must be in \(0, 1\]"),
    (["optimizer.mfac.window=0"], r"optimizer\.mfac: window must be an int ≥ 1"),
    (["optimizer.mfac.damping=0"], r"optimizer\.mfac: damping must be > 0 or 'gns'"),
    (["optimizer.mfac.damping=newton"], r"optimizer\.mfac: damping must be > 0 or 'gns'"),
    (["optimizer.name=sophia", "engine.zero_stage=2"], r"optimizer\.name=sophia \(needs whole blocks\) .* needs engine\.zero_stage=0"),
    (["optimizer.name=adahessian", "engine.zero_stage=0", "optimizer.per_layer=true", "engine.grad_clip=0"],
     r"optimizer\.per_layer is not supported by optimizer\.name=adahessian"),
    (["optimizer.name=mfac", "engine.zero_stage=0", "optimizer.mfac.damping=gns", "optimizer.weight_decay=0"],
     r"optimizer\.name=mfac re-evaluates its own gradients .* set engine\.grad_clip=0"),
    (["optimizer.name=sophia", "engine.zero_stage=0", "optimizer.sophia.micro_batches=2"],
     r"optimizer\.sophia\.micro_batches \(2\) must be ≤ the micro-batches per worker and step"),
    (["optimizer.name=adahessian", "engine.zero_stage=0", "model.compile=true"],
     r"optimizer\.adahessian\.method=autograd differentiates twice"),
])
def test_bad_curvature_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(*overrides)


def test_bad_curvature_config_exits_2_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    result = curvtrain("pretrain", "--config", str(CONFIG), "--out", str(out),
                       "--set", "optimizer.name=mfac", "--set", "optimizer.mfac.window=0")
    assert result.returncode == 2, result.stderr
    assert "optimizer.mfac: window must be an int ≥ 1" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())
