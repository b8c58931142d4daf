"""A step on which a curvature estimate is due takes the training gradient from the estimate's own pass
(GNB: the same forward; Hutchinson: its first backward, as AdaHessian's official code does): the update
rule must receive exactly the gradient of the step's batch, and the step must report its loss.

The reference is plain autograd on `engine.module` at the weights before the step, over the same
micro-batches; one real process in a gloo group runs the `Trainer`'s own step (DeepSpeed engine, the corpus).
"""
import json

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny, trainer_in_gloo_group

COMMON = ("engine.zero_stage=0", "engine.grad_clip=0", "workers.num_workers=1")  # tiny: 2 micro-batches per step


def gradient_seen_by_the_rule(rank: int, store_dir: str, overrides: tuple, out: str) -> None:
    trainer = trainer_in_gloo_group(rank, 1, store_dir, *overrides)
    module, accum = trainer.engine.module, trainer.cfg.grad_accum
    params = [p for p in module.parameters() if p.requires_grad]
    loss = sum(module(*trainer.micro_batch(m)) for m in range(accum)) / accum
    expected = torch.autograd.grad(loss, params)
    seen = {}
    step_param = trainer.rule.step_param

    def recording(p, group):
        seen[p] = p.grad.detach().clone()
        step_param(p, group)

    trainer.rule.step_param = recording
    reported = trainer.train_step().item()
    errors = [((seen[p] - e).norm() / e.norm()).item() for p, e in zip(params, expected)]
    with open(out, "w") as f:
        json.dump({"accum": accum, "stepped": len(seen), "params": len(params), "max_rel_error": max(errors),
                   "loss": loss.item(), "reported": reported}, f)


@pytest.mark.parametrize("overrides", [
    ("optimizer.name=sophia", "optimizer.sophia.every=1", "optimizer.sophia.micro_batches=1"),  # shared: 1 of 2
    ("optimizer.name=adahessian",),  # autograd HVP on all micro-batches: no separate training pass
    ("optimizer.name=adahessian", "optimizer.adahessian.method=finite_difference"),
], ids=["sophia_gnb_one_of_two", "adahessian_autograd", "adahessian_finite_difference"])
def test_estimate_step_gives_the_rule_the_batch_gradient(tmp_path, overrides):
    from curvtrain.models.data import prepare_tokens

    prepare_tokens(tiny(*COMMON, *overrides).data)  # as the coordinator does before workers start
    out = tmp_path / "seen.json"
    mp.spawn(gradient_seen_by_the_rule, args=(str(tmp_path), (*COMMON, *overrides), str(out)), nprocs=1)
    result = json.loads(out.read_text())
    assert result["accum"] == 2
    assert result["stepped"] == result["params"]
    assert result["max_rel_error"] < 1e-4  # the math attention kernel of the HVP pass vs the default one
    assert result["reported"] == pytest.approx(result["loss"], rel=1e-5)
