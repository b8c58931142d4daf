"""The owner distributor's pieces on their own: the bucket plan (no processes), and one rank's step against
the rule it wraps (a world-size-1 gloo group)."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import tiny
from curvtrain.distributed.distributor import OwnerDistributor
from curvtrain.distributed.distributor.owner import Buckets
from curvtrain.optim import AdamW


def test_buckets_hold_every_parameter_once_by_owner_and_dtype_up_to_the_cap():
    f32 = [torch.zeros(n) for n in (10, 30, 5, 50, 7, 8)]
    bf16 = [torch.zeros(6, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16)]
    params = [f32[0], bf16[0], f32[1], f32[2], f32[3], bf16[1], f32[4], f32[5]]
    owner = {p: (0 if i % 3 else 1) for i, p in enumerate(params)}
    cap = 40 * 4  # bytes: 40 float32 values
    buckets = Buckets(params, owner, cap)
    index = {id(p): i for i, p in enumerate(params)}
    placed = [p for b in buckets for p in b.offsets]
    assert sorted(map(id, placed)) == sorted(map(id, params))  # each parameter exactly once
    for b in buckets:
        members = list(b.offsets)
        assert {owner[p] for p in members} == {b.owner} and len({p.dtype for p in members}) == 1
        assert [index[id(p)] for p in members] == sorted(index[id(p)] for p in members)  # plan order kept
        assert b.numel == sum(p.numel() for p in members)
        assert list(b.offsets.values()) == [sum(p.numel() for p in members[:i]) for i in range(len(members))]
        # a bucket closes once it reaches the cap: only its last parameter may take it there
        assert sum(p.numel() * p.element_size() for p in members[:-1]) < cap
    # packing and viewing round-trips every value
    values = {p: torch.arange(p.numel(), dtype=p.dtype) + i for i, p in enumerate(params)}
    for b in buckets:
        b.pack(values.get)
        for p, view in b.slices():
            assert torch.equal(view, values[p].view_as(p))


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_one_rank_step_equals_the_rule_with_torchs_clipping(one_rank_group, clip):
    """Reduce, clip (by min(max_norm / (‖g‖ + 1e-6), 1), computed on the device), update, return: on one
    rank that is the rule's own step after torch.nn.utils.clip_grad_norm_."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    models = [nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    rule, reference = AdamW(models[0].parameters(), lr=0.1), AdamW(models[1].parameters(), lr=0.1)
    names = {n: 0 for n, _ in models[0].named_parameters()}
    cfg = tiny("engine.zero_stage=0", f"engine.grad_clip={clip}", "optimizer.per_layer=false", "workers.num_workers=1")
    distributor = OwnerDistributor(cfg, models[0], rule, names)
    for _ in range(3):
        for model in models:
            (model(x) - y).square().mean().backward()
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(models[1].parameters(), clip)
            assert norm > clip  # clipping really acts
        distributor.client_optimizer.step()  # as the engine calls it at the boundary, then zero_grad
        distributor.client_optimizer.zero_grad()
        reference.step()
        reference.zero_grad()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
