"""INT8 weights with APOLLO-Mini through `curvtrain pretrain`'s path: owner distributor, per-layer updates,
real Ray workers and DeepSpeed ZeRO-0 engines (tiny recipe)."""
import pytest
import torch

from conftest import resume_from_step_10
from curvtrain.distributed import checkpoint
from curvtrain.distributed.export import consolidated_state_dict
from curvtrain.distributed.metrics import read_metrics
from curvtrain.optim.int8 import CODES, SCALE

pytestmark = pytest.mark.slow
MINI = ("optimizer.name=apollo_mini", "model.weights=int8", "engine.zero_stage=0", "optimizer.per_layer=true",
        "engine.grad_clip=0", "optimizer.lr=0.01")
ONE, TWO = ("workers.num_workers=1",), ("workers.num_workers=2",)


def model_file(run_dir, step=20):
    with checkpoint.weights_only_loading():
        return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt",
                          weights_only=True)["module"]


def test_checkpoint_holds_int8_codes_and_the_run_trains(runs):
    module = model_file(runs(*MINI, *TWO))
    codes = [k for k in module if k.endswith(CODES)]
    assert len(codes) == 14 and all(module[k].dtype == torch.int8 for k in codes)
    assert all(module[k[:-len(CODES)] + SCALE].dtype == torch.float32 for k in codes)
    loss = [r["loss"] for r in read_metrics(runs(*MINI, *TWO))]
    assert loss[-1] < loss[0] - 2.0


def test_two_workers_equal_one_worker(runs):
    """The same seeds for the projections and the rounding on the owner; the weights a non-owner gets back
    are the owner's INT8 values (float32 transport, requantized exactly)."""
    a, b = (consolidated_state_dict(runs(*MINI, *n) / "checkpoints" / "step_00000020") for n in (ONE, TWO))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_resume_equals_uninterrupted(runs, tmp_path):
    full = runs(*MINI, *TWO)
    resumed = resume_from_step_10(full, tmp_path / "resumed", *MINI, *TWO)
    a, b = model_file(full), model_file(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_metrics(full)] == [r["loss"] for r in read_metrics(resumed)]


def test_int8_weights_refuse_an_optimizer_that_writes_views():
    from conftest import tiny
    from curvtrain.launcher.config import ConfigError

    with pytest.raises(ConfigError, match="model.weights=int8 needs an optimizer that writes its matrices whole"):
        tiny("model.weights=int8", "optimizer.name=adamw")
