"""Curvature estimators against exact float64 Hessians and Gauss-Newton matrices of a small softmax model."""
import math

import pytest
import torch
import torch.nn.functional as F

from curvtrain.optim.curvature import block_average, gnb_diag, hutchinson_diag, hvp

N, D, HIDDEN, C = 6, 4, 3, 3  # samples, inputs, hidden units, classes: 21 parameters


def softmax_model(seed=0):
    """A two-layer softmax classifier, logits = tanh(X W1) W2 (its Hessian differs from its Gauss-Newton matrix)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=gen)
    params = [torch.randn(D, HIDDEN, generator=gen, dtype=torch.float64).requires_grad_(),
              torch.randn(HIDDEN, C, generator=gen, dtype=torch.float64).requires_grad_()]

    def logits_of(w1, w2):
        return torch.tanh(x @ w1) @ w2

    return params, logits_of, y


def flat_fn(params, fn):
    """fn(*params) as a function of one flat vector (for torch.autograd.functional)."""
    sizes = [p.numel() for p in params]

    def f(theta):
        return fn(*(t.view_as(p) for t, p in zip(theta.split(sizes), params)))

    return f, torch.cat([p.detach().reshape(-1) for p in params])


def exact_hessian(params, logits_of, y):
    f, theta = flat_fn(params, lambda *ps: F.cross_entropy(logits_of(*ps), y))
    return torch.autograd.functional.hessian(f, theta)


def exact_gauss_newton_diag(params, logits_of):
    """diag((1/N) Σₙ Jₙᵀ (diag(pₙ) − pₙpₙᵀ) Jₙ), Jₙ the Jacobian of sample n's logits."""
    f, theta = flat_fn(params, logits_of)
    jac = torch.autograd.functional.jacobian(f, theta)  # [N, C, P]
    probs = f(theta).softmax(-1)
    hess_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    return torch.einsum("ncp,ncd,ndp->p", jac, hess_out, jac) / N


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_hvp_autograd_is_exact_and_finite_difference_error_is_order_eps():
    params, logits_of, y = softmax_model()
    loss_fn = lambda: F.cross_entropy(logits_of(*params), y)  # noqa: E731
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    exact = exact_hessian(params, logits_of, y) @ flat(v)
    torch.testing.assert_close(flat(hvp(loss_fn, params, v)), exact, rtol=1e-12, atol=1e-12)

    before = [p.detach().clone() for p in params]
    errors = {eps: (flat(hvp(loss_fn, params, v, method="finite_difference", eps=eps)) - exact).norm().item()
              for eps in (1e-2, 1e-3, 1e-4)}
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # parameters restored exactly
    for big, small in ((1e-2, 1e-3), (1e-3, 1e-4)):  # forward difference: error ∝ ε
        assert 5 < errors[big] / errors[small] < 20, errors
    assert errors[1e-4] < 1e-3 * exact.norm().item()


def rms_relative_error(estimate, exact, samples, repeats, seed):
    """RMS over independent `samples`-sample estimates of ‖estimate − exact‖ / ‖exact‖."""
    gen = torch.Generator().manual_seed(seed)
    errs = [((flat(estimate(samples, gen)) - exact).norm() / exact.norm()).item() ** 2 for _ in range(repeats)]
    return math.sqrt(sum(errs) / repeats)


@pytest.mark.parametrize("which", ["hutchinson", "gnb"])
def test_estimates_converge_to_exact_diagonal_like_one_over_sqrt_samples(which):
    params, logits_of, y = softmax_model()
    if which == "hutchinson":
        exact = torch.diagonal(exact_hessian(params, logits_of, y))
        loss_fn = lambda: F.cross_entropy(logits_of(*params), y)  # noqa: E731
        estimate = lambda n, gen: hutchinson_diag(loss_fn, params, samples=n, generator=gen)  # noqa: E731
    else:
        exact = exact_gauss_newton_diag(params, logits_of)
        assert (exact - torch.diagonal(exact_hessian(params, logits_of, y))).abs().max() > 1e-3  # GN ≠ H here
        estimate = lambda n, gen: gnb_diag(lambda: logits_of(*params), params, samples=n, generator=gen)  # noqa: E731
    few = rms_relative_error(estimate, exact, 4, repeats=16, seed=2)
    many = rms_relative_error(estimate, exact, 64, repeats=16, seed=3)
    assert 0.15 < many / few < 0.4, (few, many)  # √(4/64) = 0.25
    assert many < 0.4


def test_hutchinson_finite_difference_matches_autograd_to_order_eps():
    params, logits_of, y = softmax_model()
    loss_fn = lambda: F.cross_entropy(logits_of(*params), y)  # noqa: E731
    exact = flat(hutchinson_diag(loss_fn, params, samples=4, generator=torch.Generator().manual_seed(5)))
    fd = flat(hutchinson_diag(loss_fn, params, samples=4, method="finite_difference", eps=1e-5,
                              generator=torch.Generator().manual_seed(5)))  # the same Rademacher draws
    assert (fd - exact).norm() < 1e-3 * exact.norm()


@pytest.mark.parametrize("which", ["hutchinson_autograd", "hutchinson_finite_difference", "gnb"])
def test_estimate_pass_gives_the_training_gradient_and_the_same_estimate(which):
    """grad_out receives the training loss's gradient (autograd's), and asking for it leaves the estimate as it was."""
    params, logits_of, y = softmax_model()
    loss_fn = lambda: F.cross_entropy(logits_of(*params), y)  # noqa: E731
    expected = torch.autograd.grad(loss_fn(), params)
    grad_out = [torch.full_like(p, 0.5) for p in params]  # added into, not overwritten

    def estimate(**kwargs):
        gen = torch.Generator().manual_seed(3)
        if which == "gnb":
            if kwargs:
                kwargs["train_loss"] = lambda logits: F.cross_entropy(logits, y)
            return gnb_diag(lambda: logits_of(*params), params, samples=2, generator=gen, **kwargs)
        method = which.removeprefix("hutchinson_")
        return hutchinson_diag(loss_fn, params, samples=2, method=method, generator=gen, **kwargs)

    plain, shared = estimate(), estimate(grad_out=grad_out)
    for a, b in zip(plain, shared):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for g, e in zip(grad_out, expected):
        torch.testing.assert_close(g, e + 0.5, rtol=1e-12, atol=1e-12)


def test_block_average():
    x = torch.arange(10, dtype=torch.float64).view(2, 5)
    out = block_average(x, 4)
    expected = torch.tensor([1.5] * 4 + [5.5] * 4 + [8.5] * 2, dtype=torch.float64).view(2, 5)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(block_average(x, 1), x)


def test_bad_arguments():
    params, logits_of, y = softmax_model()
    loss_fn = lambda: F.cross_entropy(logits_of(*params), y)  # noqa: E731
    with pytest.raises(ValueError, match="method must be one of"):
        hvp(loss_fn, params, params, method="exact")
    with pytest.raises(ValueError, match="samples must be ≥ 1"):
        hutchinson_diag(loss_fn, params, samples=0)
    with pytest.raises(ValueError, match="block_size must be ≥ 1"):
        block_average(params[0], 0)
