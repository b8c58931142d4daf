"""The divergence verdict without processes (a stand-in engine exposing DeepSpeed's three readings);
tests/test_reliability.py runs it inside real runs at ZeRO 0 and 1."""
import pytest
import torch

from curvtrain.distributed.health import Health


class Engine:
    """What `Health` reads of a DeepSpeed engine: its grad norm, whether the step applied, skipped steps."""

    def __init__(self, norm=None, applied=True, skipped=0):
        self.norm, self.applied, self.skipped_steps = norm, applied, skipped
        self.module = torch.nn.Linear(3, 2)

    def get_global_grad_norm(self):
        return self.norm

    def was_step_applied(self):
        return self.applied


def test_the_first_non_finite_step_is_named_at_the_check():
    health, ok = Health(5, torch.device("cpu")), Engine(norm=1.0)
    health.observe(1, torch.tensor(2.0), ok)
    assert health.problem(1, ok, weights=True) is None
    health.observe(2, torch.tensor(2.0), Engine(norm=float("inf"), applied=False))  # a skipped step is no divergence
    health.observe(3, torch.tensor(2.0), Engine(norm=torch.tensor(float("nan"))))  # an applied NaN norm is
    health.observe(4, torch.tensor(float("nan")), ok)
    assert health.problem(4, ok) == "the loss or gradient norm is not finite (NaN or inf) at step 3: the run diverged"


def test_non_finite_weights_are_found_before_sealing():
    health, engine = Health(5, torch.device("cpu")), Engine()
    health.observe(7, torch.tensor(2.0), engine)
    with torch.no_grad():
        engine.module.weight[1, 2] = float("inf")
    assert health.problem(7, engine) is None  # the loss alone says nothing yet
    assert health.problem(7, engine, weights=True) == "the weights are not finite (NaN or inf) after step 7: the run diverged"


@pytest.mark.parametrize("skipped, fails", [(3, False), (4, True)])
def test_skipped_steps_past_the_limit_fail(skipped, fails):
    health, engine = Health(3, torch.device("cpu")), Engine(skipped=skipped)
    health.observe(9, torch.tensor(2.0), engine)
    problem = health.problem(9, engine)
    assert (problem is not None) == fails
    if fails:
        assert problem.startswith("DeepSpeed has skipped 4 of 9 steps") and "run.max_skipped_steps=3" in problem
