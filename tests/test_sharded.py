"""OwnerShardedOptimizer in one process (a world-size-1 gloo group): the torch.optim.Optimizer contract."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from curvtrain.distributed.sharded import OwnerShardedOptimizer
from curvtrain.optim import AdamW


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_step_runs_the_closure_and_returns_its_loss(one_rank_group):
    """step(closure) evaluates the closure with gradients enabled (inside step's no_grad) and steps on
    the gradients it produced, as torch optimizers do; the weights equal the unwrapped optimizer's."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    models = [nn.Linear(4, 2), nn.Linear(4, 2)]
    models[1].load_state_dict(models[0].state_dict())
    initial = models[0].weight.detach().clone()
    inner = AdamW(models[0].parameters(), lr=0.1)
    names = {p: n for n, p in models[0].named_parameters()}
    sharded = OwnerShardedOptimizer(inner, {n: 0 for n in names.values()}, names)
    reference = AdamW(models[1].parameters(), lr=0.1)
    for model, opt in ((models[0], sharded), (models[1], reference)):
        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert loss is not None and loss.item() > 0
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)
    assert not torch.equal(models[0].weight, initial)  # the closure's gradients were used
