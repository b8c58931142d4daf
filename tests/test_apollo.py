"""APOLLO / APOLLO-Mini (optim.apollo) against the published update written out here step by step."""
import math

import pytest
import torch

from curvtrain.optim import attach_per_layer_step
from curvtrain.optim.apollo import APOLLO_MINI_DEFAULTS, NORM_GROWTH, Apollo, seed_of
from curvtrain.optim.int8 import Int8Weight
from curvtrain.optim.projector import random_basis

BETAS, EPS, LR, WD = (0.9, 0.999), 1e-8, 0.01, 0.1


def reference(w, grads, *, rank, scale, scale_type, update_gap, index=0):
    """Zhu et al. 2024, Alg. 1 (with the official code's norm-growth limiter), in float64: one weight W
    (m×n), P_t Gaussian N(0, 1/r) from the seeds, Adam in the projected space, the scaling factor from it."""
    w, m, v, prev = w.double().clone(), None, None, None
    m_rows, n_cols = w.shape
    left = m_rows < n_cols  # the basis on the shorter side
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = random_basis(w.shape, rank, "left" if left else "right",
                         seed_of(index, (t - 1) // update_gap, "basis"), dtype=torch.float64)
        r = p.T @ g if left else g @ p.T  # r×n or m×r
        m = torch.zeros_like(r) if m is None else m
        v = torch.zeros_like(r) if v is None else v
        m = BETAS[0] * m + (1 - BETAS[0]) * r
        v = BETAS[1] * v + (1 - BETAS[1]) * r * r
        n = (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
        if scale_type == "tensor":
            s = n.norm() / (r.norm() + 1e-8)
        else:  # one factor per column (left: r×n) or per row (right: m×r) of the full matrix
            dim = 0 if left else 1
            s = n.norm(dim=dim) / (r.norm(dim=dim) + 1e-8)
            s = s[None, :] if left else s[:, None]
        g_tilde = g * s
        if prev is not None and g_tilde.norm() > NORM_GROWTH * prev:
            g_tilde = g_tilde * (NORM_GROWTH * prev / g_tilde.norm())
        prev = g_tilde.norm()
        w = (1 - LR * WD) * w - LR * math.sqrt(scale) * g_tilde
    return w


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)], ids=["left", "right"])
@pytest.mark.parametrize("options", [dict(rank=4, scale=1.0, scale_type="channel", update_gap=2), APOLLO_MINI_DEFAULTS],
                         ids=["apollo", "apollo_mini"])
def test_steps_follow_the_published_update(shape, options):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + t) for t in range(5)]  # growing: the limiter acts
    p = torch.nn.Parameter(w0.clone())
    opt = Apollo([{"params": [p], **options}], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    assert torch.allclose(p.detach(), reference(w0, grads, **options), rtol=1e-10, atol=1e-12)
    assert set(opt.state[p]) == {"step", "index", "update_norm", "exp_avg", "exp_avg_sq"}  # no basis kept
    assert opt.state[p]["exp_avg"].numel() == options["rank"] * max(shape)  # r × the kept (longer) side


def test_basis_is_regenerated_from_its_seed_and_renewed_every_update_gap():
    a = random_basis((8, 30), 3, "left", seed_of(2, 0, "basis"))
    assert torch.equal(a, random_basis((8, 30), 3, "left", seed_of(2, 0, "basis")))
    assert not torch.equal(a, random_basis((8, 30), 3, "left", seed_of(2, 1, "basis")))
    assert not torch.equal(a, random_basis((8, 30), 3, "left", seed_of(3, 0, "basis")))
    big = random_basis((400, 500), 200, "left", 0)
    assert big.shape == (400, 200) and abs(big.var().item() - 1 / 200) < 1e-4


def test_apollo_mini_state_is_two_rank_one_moments():
    p = torch.nn.Parameter(torch.randn(64, 256))
    opt = Apollo([{"params": [p], **APOLLO_MINI_DEFAULTS}], lr=LR)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].shape == (1, 256) and opt.state[p]["exp_avg_sq"].shape == (1, 256)
    assert opt.state_numel(p, opt.param_groups[0]) == 2 * 256 + 2


def test_per_layer_steps_of_int8_weights_equal_the_ordinary_step():
    """Inside backward (per-layer hooks) or after it: the same INT8 codes (the same seeds for the rounding)."""
    def run(per_layer):
        torch.manual_seed(0)
        layer = torch.nn.Linear(16, 24, bias=False)
        layer.weight = torch.nn.Parameter(Int8Weight.from_float(layer.weight.detach()))
        opt = Apollo([{"params": [layer.weight], **APOLLO_MINI_DEFAULTS}], lr=LR)
        if per_layer:
            attach_per_layer_step(layer, opt)
        x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            layer(x).square().sum().backward()
            if not per_layer:
                opt.step()
                opt.zero_grad()
        return layer.weight.codes, layer.weight.scale

    (c1, s1), (c2, s2) = run(False), run(True)
    assert torch.equal(c1, c2) and torch.equal(s1, s2)


def test_bad_options_are_refused():
    p = torch.nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match="scale_type"):
        Apollo([{"params": [p], "rank": 1, "scale_type": "row"}])
    with pytest.raises(ValueError, match="rank ≤ min"):
        Apollo([{"params": [p], "rank": 5}])
