"""Sophia, AdaHessian and blockwise M-FAC (with GNS damping) against their equations, in float64."""
import copy
import io

import pytest
import torch
from torch import nn

from curvtrain.optim import MFAC, AdaHessian, Sophia
from curvtrain.optim.mfac import GNS_GAMMA0
from curvtrain.optim.state import CurvatureOptimizer

F64 = torch.float64


def random_grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=F64) for _ in range(steps)]


# ---- M-FAC ----

def dense_mfac_steps(w0, grads, *, lr, window, damping, block_size, momentum=0.0, weight_decay=0.0):
    """Reference: per block, θ ← θ − lr · u, u ← μu + (1−μ) (λI + (1/m) Σᵢ gᵢgᵢᵀ)⁻¹ g over the last m
    gradients, with dense matrices."""
    w = w0.clone().reshape(-1)
    history, buf, out = [], torch.zeros_like(w), []
    for g in grads:
        g = g.reshape(-1) + weight_decay * w
        history = (history + [g])[-window:]
        direction = torch.empty_like(w)
        for start in range(0, w.numel(), block_size):
            sl = slice(start, start + block_size)
            fisher = damping * torch.eye(len(w[sl]), dtype=F64)
            for h in history:
                fisher += torch.outer(h[sl], h[sl]) / window
            direction[sl] = torch.linalg.solve(fisher, g[sl])
        buf = momentum * buf + (1 - momentum) * direction if momentum else direction
        w = w - lr * buf
        out.append(w.view_as(w0).clone())
    return out


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.5, 0.1)])
def test_mfac_step_equals_dense_inverse_fisher_per_block_also_after_the_window_wraps(momentum, weight_decay):
    shape, steps = (2, 5), 7  # 10 entries in blocks of 4, 4, 2; a window of 3 wraps twice
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    grads = random_grads(shape, steps)
    kw = dict(lr=0.1, window=3, damping=1e-3, block_size=4, momentum=momentum, weight_decay=weight_decay)
    expected = dense_mfac_steps(w0, grads, **kw)
    w = nn.Parameter(w0.clone())
    opt = MFAC([w], **kw)
    for g, want in zip(grads, expected):
        w.grad = g.clone()
        opt.step()
        torch.testing.assert_close(w.detach(), want, rtol=1e-9, atol=1e-9)
    assert opt.state[w]["grads"].shape == (3, 3, 4)  # 3 blocks × window 3 × block length 4


def quadratic(seed=0, dim=6):
    """f(x) = ½ xᵀAx − bᵀx with A symmetric positive definite (condition number 100)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64))
    a = q @ torch.diag(torch.logspace(-1, 1, dim, dtype=F64)) @ q.T
    return a, torch.randn(dim, generator=gen, dtype=F64)


def test_gns_accepts_and_rejects_by_its_rule_on_a_quadratic():
    a, b = quadratic()
    f = lambda x: 0.5 * x @ a @ x - b @ x  # noqa: E731
    grad = lambda x: a @ x - b  # noqa: E731
    x0 = 3 * torch.ones(6, dtype=F64)
    window, lr, steps = 2, 1.0, 6

    # reference: the rule written out densely
    x, gamma, history, trace, ref = x0.clone(), GNS_GAMMA0, [], [], []
    for _ in range(steps):
        g = grad(x)
        history = (history + [g])[-window:]
        fisher = sum(torch.outer(h, h) for h in history) / window
        for _ in range(10):
            lam = g.norm().item() / gamma
            trial = x - lr * torch.linalg.solve(fisher + lam * torch.eye(6, dtype=F64), g)
            accepted = f(x) - f(trial) >= grad(trial).norm() ** 2 / (8 * lam)
            trace.append(bool(accepted))
            gamma = gamma * 2 if accepted else gamma / 2
            if accepted:
                x = trial
                break
        ref.append((x.clone(), gamma))
    assert set(trace) == {True, False}  # both branches of the rule (accept, reject) are exercised

    w = nn.Parameter(x0.clone())
    opt = MFAC([w], lr=lr, window=window, damping="gns", block_size=64)
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = f(w)
        loss.backward()
        return loss.detach()

    for want_x, want_gamma in ref:
        opt.step(closure)
        torch.testing.assert_close(w.detach(), want_x, rtol=1e-9, atol=1e-9)
        assert opt.state["gns"]["gamma"].item() == want_gamma
    assert calls == steps + len(trace)  # once at x per step, once per trial
    assert f(w.detach()) < f(x0)


def test_gns_needs_a_closure_and_mfac_validates():
    w = nn.Parameter(torch.ones(3, dtype=F64))
    w.grad = torch.ones(3, dtype=F64)
    with pytest.raises(RuntimeError, match="needs step\\(closure\\)"):
        MFAC([w], lr=1.0, damping="gns").step()
    with pytest.raises(ValueError, match="damping must be > 0 or 'gns'"):
        MFAC([w], lr=1.0, damping=0.0)
    with pytest.raises(ValueError, match="window must be an int ≥ 1"):
        MFAC([w], lr=1.0, window=0)


# ---- Sophia ----

def test_sophia_moves_no_coordinate_more_than_lr_and_reports_its_win_rate():
    lr, wd, rho, betas, eps = 0.05, 0.1, 0.04, (0.965, 0.99), 1e-15
    shape = (40, 25)
    w = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=F64))
    opt = Sophia([w], lr=lr, betas=betas, rho=rho, weight_decay=wd, eps=eps)
    grads, estimates = random_grads(shape, 12, seed=4), random_grads(shape, 12, seed=5)
    m, h, x = torch.zeros(shape, dtype=F64), torch.zeros(shape, dtype=F64), w.detach().clone()
    win_rates = []
    for t, (g, e) in enumerate(zip(grads, estimates)):
        if t % 3 == 0:  # an estimate every k = 3 steps, from step 0; |e| · 20 spreads h over clipped and unclipped
            opt.update_hessian({w: 20 * e.abs()})
            h = betas[1] * h + (1 - betas[1]) * 20 * e.abs()
        w.grad = g.clone()
        before = w.detach().clone()
        opt.step()
        m = betas[0] * m + (1 - betas[0]) * g
        x = x * (1 - lr * wd) - lr * (m / torch.clamp(rho * h, min=eps)).clamp(-1, 1)
        torch.testing.assert_close(w.detach(), x, rtol=1e-12, atol=1e-12)
        assert ((w.detach() - before * (1 - lr * wd)).abs() <= lr * (1 + 1e-12)).all()
        num, den = opt.metrics()["win_rate"]
        assert num.item() / den.item() == (m.abs() < torch.clamp(rho * h, min=eps)).double().mean().item()
        win_rates.append(num.item() / den.item())
    assert win_rates[0] > 0 and 0 < max(win_rates) < 1  # some coordinates clipped, some not



def test_sophia_with_indefinite_estimates_moves_no_coordinate_more_than_lr():
    """Hutchinson estimates u ⊙ (Hu) of random sign (a locally concave loss): h turns negative on many
    coordinates, and still every step moves each coordinate by at most lr besides the decay — the
    paper's two-sided clip(m / max(ρh, ε), 1), where a one-sided min(|m| / (ρh + ε), 1) divides by a
    negative number. Where h ≤ 0 the step is lr · sign(m), downhill."""
    lr, wd, rho = 0.01, 0.1, 0.04
    shape = (30, 20)
    w = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=F64))
    opt = Sophia([w], lr=lr, rho=rho, weight_decay=wd)
    grads, estimates = random_grads(shape, 15, seed=10), random_grads(shape, 15, seed=11)
    negative_seen = 0
    for t, (g, e) in enumerate(zip(grads, estimates)):
        if t % 2 == 0:
            opt.update_hessian({w: 1e-3 * e})  # both signs, small: one-sided clipping would move coordinates by ~lr/(ρ·1e-5)
        w.grad = g.clone()
        before = w.detach().clone()
        opt.step()
        h, m = opt.state[w]["hessian"], opt.state[w]["exp_avg"]
        moved = w.detach() - before * (1 - lr * wd)
        assert (moved.abs() <= lr * (1 + 1e-12)).all(), moved.abs().max()
        concave = h <= 0
        negative_seen += int(concave.sum())
        torch.testing.assert_close(moved[concave], -lr * m.sign()[concave], rtol=0, atol=1e-15)
    assert negative_seen > 0

# ---- AdaHessian ----

@pytest.mark.parametrize("estimate", ["abs_grad", "ones"])
def test_adahessian_equals_adam_when_the_hessian_estimate_is_the_gradient_scale(estimate):
    """D = |g| makes AdaHessian's v Adam's EMA of g²; D = 1 with gradients of ±1 entries does too."""
    shape, steps = (6, 7), 10
    grads = random_grads(shape, steps, seed=6)
    if estimate == "ones":
        grads = [g.sign() for g in grads]
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    ours, adam = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    kw = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-4)
    opt, ref = AdaHessian([ours], block_size=1, **kw), torch.optim.Adam([adam], **kw)
    for g in grads:
        opt.update_hessian({ours: g.abs() if estimate == "abs_grad" else torch.ones_like(g)})
        ours.grad, adam.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(ours.detach(), adam.detach(), rtol=1e-12, atol=1e-12)


def test_adahessian_averages_the_estimate_over_blocks_and_needs_one():
    w = nn.Parameter(torch.zeros(2, 4, dtype=F64))
    opt = AdaHessian([w], lr=0.1, block_size=4)
    w.grad = torch.ones(2, 4, dtype=F64)
    with pytest.raises(RuntimeError, match="no Hessian estimate yet"):
        opt.step()
    opt.update_hessian({w: torch.tensor([[1.0, -3.0, 2.0, 2.0], [0.0, 0.0, 0.0, 4.0]], dtype=F64)})
    torch.testing.assert_close(opt.state[w]["hessian_diag"], torch.tensor([[2.0] * 4, [1.0] * 4], dtype=F64))


# ---- all: checkpoints ----

def make(name, params):
    return {
        "sophia": lambda: Sophia(params, lr=0.01),
        "adahessian": lambda: AdaHessian(params, lr=0.01, block_size=3),
        "mfac": lambda: MFAC(params, lr=0.01, window=3, damping=1e-2, momentum=0.5, block_size=5),
        "mfac_gns": lambda: MFAC(params, lr=1.0, window=3, damping="gns", block_size=5),
    }[name]()


@pytest.mark.parametrize("name", ["sophia", "adahessian", "mfac", "mfac_gns"])
def test_state_dict_round_trip_resumes_exactly(name):
    """6 steps in one go equal 3 steps, state_dict through torch.save (weights_only), a fresh optimizer, 3 more."""
    gen = torch.Generator().manual_seed(8)
    target = torch.randn(4, 3, generator=gen, dtype=F64)
    w0 = torch.randn(4, 3, generator=gen, dtype=torch.float32)

    def run(w, opt, steps):
        for _ in range(steps):
            def closure():
                opt.zero_grad()
                loss = (w.double() - target).pow(4).sum()
                loss.backward()
                return loss.detach()
            if isinstance(opt, CurvatureOptimizer):
                closure()
                opt.update_hessian({w: w.grad.abs()})  # any estimate will do here
            closure()
            opt.step(closure)

    full = nn.Parameter(w0.clone())
    run(full, make(name, [full]), 6)
    half = nn.Parameter(w0.clone())
    opt = make(name, [half])
    run(half, opt, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = make(name, [half])
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run(half, resumed, 3)
    assert torch.equal(full.detach(), half.detach())
    assert not torch.equal(half.detach(), w0)
    assert copy.deepcopy(resumed.state_dict())["state"]  # tensors only: deep-copyable, non-empty


@pytest.mark.parametrize("name", ["sophia", "adahessian", "mfac"])
def test_state_numel_is_the_state_the_optimizer_allocates(name):
    """Block ownership is balanced by `state_numel`: it must count the floating state really created."""
    params = [nn.Parameter(torch.randn(7, 9)), nn.Parameter(torch.randn(4))]
    opt = make(name, params)
    for p in params:
        p.grad = torch.randn_like(p)
    if isinstance(opt, CurvatureOptimizer):
        opt.update_hessian({p: p.grad.abs() for p in params})
    opt.step()
    for p in params:
        allocated = sum(t.numel() for t in opt.state[p].values() if t.is_floating_point())
        assert opt.state_numel(p, opt.param_groups[0]) == allocated
