"""Muon (optim.muon) against torch.optim.Muon on the matrices and AdamW on the rest, in one process."""
import io

import pytest
import torch
from torch import nn

from curvtrain.optim import AdamW, attach_per_layer_step
from curvtrain.optim.muon import Muon, muon_param_groups
from curvtrain.optim.registry import MuonConfig, OptimizerConfig, build_optimizer


def grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
@pytest.mark.parametrize("adjust_lr_fn, nesterov", [("original", True), ("match_rms_adamw", True), ("original", False)])
def test_update_of_one_matrix_equals_torch_muon(shape, adjust_lr_fn, nesterov):
    """Several steps of momentum, Newton–Schulz, decay and the lr scale: the same weights as torch.optim.Muon's."""
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours, ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, ns_steps=5, adjust_lr_fn=adjust_lr_fn)
    opt = Muon([dict(params=[ours], muon=True, **kw)])
    torch_opt = torch.optim.Muon([ref], **kw)
    for g in grads(shape, 6, seed=2):
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours.detach(), w0)
    torch.testing.assert_close(opt.state[ours]["momentum_buffer"], torch_opt.state[ref]["momentum_buffer"])


def test_the_other_parameters_get_adamw():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    twin = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    twin.load_state_dict(model.state_dict())
    groups = muon_param_groups(model.named_parameters(), targets=r"^1\.weight$", weight_decay=0.1)
    opt = Muon(groups, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    plain = [p for n, p in twin.named_parameters() if n != "1.weight"]
    ref = AdamW([dict(params=[p for p in plain if p.dim() >= 2], weight_decay=0.1),
                 dict(params=[p for p in plain if p.dim() < 2], weight_decay=0.0)], lr=1e-2, betas=(0.9, 0.95))
    for step in range(3):
        for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 10 + len(name)))
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if name != "1.weight":
            assert torch.equal(p, q), name
    assert len(opt.param_groups[0]["params"]) == 1 and opt.param_groups[0]["muon"]


def test_registry_entry_puts_the_hidden_matrices_in_the_muon_group():
    from curvtrain.models.llama import build_llama, llama_config

    model = build_llama(llama_config("tiny"))
    opt = build_optimizer(OptimizerConfig(name="muon", lr=3e-3, weight_decay=0.1), model.named_parameters())
    names = {p: n for n, p in model.named_parameters()}
    muon_group = opt.param_groups[0]
    assert muon_group["muon"] and muon_group["adjust_lr_fn"] == "match_rms_adamw" and muon_group["lr"] == 3e-3
    assert all("_proj." in names[p] for p in muon_group["params"])
    others = [names[p] for g in opt.param_groups[1:] for p in g["params"]]
    assert "model.embed_tokens.weight" in others and "lm_head.weight" in others and "model.norm.weight" in others
    own_lr = build_optimizer(OptimizerConfig(name="muon", lr=3e-3, muon=MuonConfig(lr=0.02, adjust_lr_fn="original")),
                             model.named_parameters())
    assert own_lr.param_groups[0]["lr"] == 0.02 and own_lr.param_groups[1]["lr"] == 3e-3


def test_bf16_weights_get_stochastically_rounded_updates():
    """Updates of ~1e-3 on weights of 1.0 are mostly below bf16's half ulp there: round to nearest would
    lose nearly all of them, stochastic rounding keeps them in expectation. With the same (bf16) gradient
    the fp32 run's update is that expectation: projected on its signs, the bf16 change matches it."""
    shape = (64, 64)
    w16, w32 = nn.Parameter(torch.ones(shape, dtype=torch.bfloat16)), nn.Parameter(torch.ones(shape))
    kw = dict(lr=8e-3, weight_decay=0.0, adjust_lr_fn="original")
    opt16, opt32 = Muon([dict(params=[w16], muon=True, **kw)]), Muon([dict(params=[w32], muon=True, **kw)])
    g = torch.randn(shape, generator=torch.Generator().manual_seed(4)).bfloat16()
    w16.grad, w32.grad = g, g.float()
    torch.manual_seed(0)  # the rounding's random bits
    opt16.step()
    opt32.step()
    assert opt16.state[w16]["momentum_buffer"].dtype == torch.float32 and w16.dtype == torch.bfloat16
    change16, change32 = w16.detach().float() - 1, w32.detach() - 1
    assert (w32.detach().bfloat16() == 1).float().mean() > 0.9  # what round to nearest would keep
    ratio = (change16 * change32.sign()).sum() / change32.abs().sum()
    assert abs(ratio.item() - 1) < 0.2, ratio


def test_state_dict_round_trip_resumes_exactly():
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}

    def make():
        return Muon(muon_param_groups(model.named_parameters(), targets=r"^0\.weight$", weight_decay=0.1), lr=1e-2)

    def run(opt, steps, start):
        for t in range(start, start + steps):
            for i, p in enumerate(model.parameters()):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * t + i))
            opt.step()

    run(make(), 6, 0)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(w0)
    opt = make()
    run(opt, 3, 0)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run(resumed, 3, 3)
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())


def test_state_numel_is_the_state_the_optimizer_allocates():
    model = nn.Sequential(nn.Linear(7, 9), nn.LayerNorm(9))
    opt = Muon(muon_param_groups(model.named_parameters(), targets=r"^0\.weight$"), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for group in opt.param_groups:
        for p in group["params"]:
            allocated = sum(t.numel() for t in opt.state[p].values() if t.is_floating_point())
            assert opt.state_numel(p, group) == allocated


def test_per_layer_steps_equal_the_whole_step():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    twin = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    targets = r"^\d\.weight$"
    opt = Muon(muon_param_groups(model.named_parameters(), targets=targets, weight_decay=0.1), lr=1e-2)
    per_layer = Muon(muon_param_groups(twin.named_parameters(), targets=targets, weight_decay=0.1), lr=1e-2)
    attach_per_layer_step(twin, per_layer)
    for step in range(4):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        twin(x).square().mean().backward()  # steps each parameter inside backward
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("group, message", [
    (dict(adjust_lr_fn="spectral"), "adjust_lr_fn must be one of"),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
    (dict(ns_steps=0), r"ns_steps must be an int in \[1, 100\)"),
])
def test_bad_muon_groups_are_refused(group, message):
    with pytest.raises(ValueError, match=message):
        Muon([dict(params=[nn.Parameter(torch.zeros(3, 4))], muon=True, **group)])


def test_muon_group_needs_matrices():
    with pytest.raises(ValueError, match=r"a Muon group needs 2-D parameters, got one of shape \(4,\)"):
        Muon([dict(params=[nn.Parameter(torch.zeros(4))], muon=True)])
    with pytest.raises(ValueError, match="Muon target rule 'nothing' matches no trainable parameter"):
        muon_param_groups(nn.Linear(2, 2).named_parameters(), targets="nothing")
