"""GradNormLoRP across real worker processes: whole matrices owned by ranks, DeepSpeed ZeRO-0 engine."""
import json
import re

import pytest
import torch
from safetensors import safe_open

from conftest import resume_from_step_10, tiny
from curvtrain.distributed import checkpoint
from curvtrain.distributed.coordinator import Coordinator
from curvtrain.distributed.distributor import OPTIMIZER_SHARD
from curvtrain.distributed.export import consolidated_state_dict
from curvtrain.distributed.metrics import read_metrics
from curvtrain.optim.gradnorm_lorp import LLAMA_TARGETS

pytestmark = pytest.mark.slow
GN = ("optimizer.name=gradnorm_lorp", "engine.zero_stage=0", "optimizer.lowrank.rank=8",
      "optimizer.lowrank.update_gap=5", "optimizer.lr=0.01")
ONE, TWO = ("workers.num_workers=1",), ("workers.num_workers=2",)
PER_LAYER = ("optimizer.per_layer=true", "engine.grad_clip=0")


def weights(run_dir, step=20):
    return consolidated_state_dict(run_dir / "checkpoints" / f"step_{step:08d}")


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_workers_equal_one_worker_after_20_steps(runs):
    one, two = runs(*GN, *ONE), runs(*GN, *TWO)
    assert max_diff(weights(one), weights(two)) <= 1e-5
    loss = [r["loss"] for r in read_metrics(two)]
    assert loss[-1] < loss[0] - 2.0


# 3 workers: 12 sequences a step (1 worker: accumulation 3); the embedding and the head go to ranks 0 and 1,
# every other block to rank 2, so two ranks own no projected matrix at all. A sum of three float32 partial
# gradients depends on their order (of two it does not), and Adam's normalization amplifies that rounding
# step by step, so the comparison is after 4 steps.
SHORT = ("schedule.max_steps=4", "run.checkpoint_interval=4", "run.eval_interval=4", "batch.global_batch_size=12")
THREE, ONE_OF_THREE = ("workers.num_workers=3", *SHORT), ("workers.num_workers=1", *SHORT)


def test_three_workers_with_uneven_ownership_equal_one_worker(runs, tmp_path):
    owners = Coordinator(tiny(*GN, *THREE), tmp_path).ownership_plan()
    with_matrix = {owners[n] for n in owners if re.search(LLAMA_TARGETS, n)}
    assert set(owners.values()) == {0, 1, 2} and len(with_matrix) < 3
    one, three = runs(*GN, *ONE_OF_THREE), runs(*GN, *THREE)
    assert max_diff(weights(one, 4), weights(three, 4)) <= 1e-5


def test_per_layer_on_three_workers_equals_one_worker(runs):
    one, three = runs(*GN, *ONE_OF_THREE, "engine.grad_clip=0"), runs(*GN, *THREE, *PER_LAYER)
    assert max_diff(weights(one, 4), weights(three, 4)) <= 1e-5


def test_per_layer_updates_on_two_workers_equal_the_ordinary_step(runs):
    ordinary, per_layer = runs(*GN, *ONE, "engine.grad_clip=0"), runs(*GN, *TWO, *PER_LAYER)
    assert max_diff(weights(ordinary), weights(per_layer)) <= 1e-5


def test_per_layer_with_accumulation_on_two_workers_equals_the_ordinary_step(runs):
    """Micro-batches of 2, accumulation 2, 2 workers: each gradient is kept until its last micro-batch,
    then reduced to its owner and stepped inside backward — the same weights as stepping after backward
    (same micro-batch shapes, so the same rounding)."""
    geometry = (*TWO, "batch.micro_batch_size=2", "engine.grad_clip=0")
    assert tiny(*GN, *geometry).grad_accum == 2
    ordinary = runs(*GN, *geometry)
    per_layer = runs(*GN, *geometry, "optimizer.per_layer=true")
    assert max_diff(weights(ordinary), weights(per_layer)) <= 1e-6


def test_optimizer_state_per_worker_is_half(runs):
    one = runs(*GN, *ONE) / "checkpoints" / "step_00000020"
    two = runs(*GN, *TWO) / "checkpoints" / "step_00000020"
    total = (one / OPTIMIZER_SHARD.format(0)).stat().st_size
    for rank in (0, 1):
        assert 0.4 * total < (two / OPTIMIZER_SHARD.format(rank)).stat().st_size < 0.6 * total


@pytest.mark.parametrize("extra", [(), PER_LAYER], ids=["whole_step", "per_layer"])
def test_owner_checkpoint_holds_the_optimizer_state_once(runs, extra):
    """At ZeRO 0 DeepSpeed writes its client optimizer's state_dict into mp_rank_00_model_states.pt; on the
    owner distributor each rank's shard is the only copy (the model file holds none)."""
    ckpt = runs(*GN, *TWO, *extra) / "checkpoints" / "step_00000020"
    with checkpoint.weights_only_loading():
        model_file = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)
    assert model_file["optimizer"] is None and model_file["module"]
    shards = [json.loads(safe_open(str(ckpt / OPTIMIZER_SHARD.format(rank)), "pt").metadata()["state"]) for rank in (0, 1)]
    assert all(shards)  # each rank's state, of the blocks it owns, by parameter name
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(model_file["module"])


def test_resume_with_8bit_state_equals_uninterrupted(runs, tmp_path):
    overrides = (*GN, *TWO, "optimizer.lowrank.eight_bit=true")
    full = runs(*overrides)
    resumed = resume_from_step_10(full, tmp_path / "resumed", *overrides)
    a, b = weights(full), weights(resumed)
    assert max_diff(a, b) == 0.0
    assert [r["loss"] for r in read_metrics(full)] == [r["loss"] for r in read_metrics(resumed)]


def test_resume_at_a_worker_count_that_cannot_keep_the_global_batch_is_refused():
    """8 sequences per step cannot be split into micro-batches of 4 over 3 workers: refused before Ray starts."""
    with pytest.raises(ValueError, match=r"global_batch_size \(8\) must be a multiple of batch.micro_batch_size × workers.num_workers \(12\)"):
        tiny(*GN, "workers.num_workers=3")


def test_galore_torch_baseline_trains_owner_sharded(runs):
    """galore-torch fails under ZeRO (flat partitions); on whole owned matrices it trains on 2 workers."""
    pytest.importorskip("galore_torch")
    loss = [r["loss"] for r in read_metrics(runs("optimizer.name=galore_adamw", *GN[1:], *TWO))]
    assert loss[-1] < loss[0] - 2.0


@pytest.mark.parametrize("name", ["gradnorm_lorp", "galore_adamw"])
def test_whole_matrix_optimizers_refuse_zero_partitions(name):
    from curvtrain.launcher.config import ConfigError

    with pytest.raises(ConfigError, match="needs engine.zero_stage=0"):
        tiny(f"optimizer.name={name}", "engine.zero_stage=2")


def test_per_layer_refuses_clipping():
    from curvtrain.launcher.config import ConfigError

    with pytest.raises(ConfigError, match="set engine.grad_clip=0"):
        tiny(*GN, "optimizer.per_layer=true")
