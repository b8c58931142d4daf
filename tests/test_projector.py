import pytest
import torch

from curvtrain.optim.projector import choose_side, lowrank_shapes, project, project_back, refresh_basis


def decaying(m, n, seed=0, decay=0.85):
    """A random m×n matrix with singular values decay**k."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen)).Q
    return u * decay ** torch.arange(min(m, n), dtype=torch.float32) @ v.T


def captured(grad, basis, side):
    return project(grad, basis, side).square().sum().item()


def top_energy(grad, rank):
    return torch.linalg.svdvals(grad)[:rank].square().sum().item()


def test_choose_side_follows_galore_rule():
    assert choose_side((10, 5)) == "right"
    assert choose_side((6, 6)) == "right"
    assert choose_side((5, 10)) == "left"
    assert choose_side((10, 5), "left") == "left"
    assert choose_side((5, 10), "right") == "right"
    with pytest.raises(ValueError, match="side must be"):
        choose_side((5, 10), "up")


@pytest.mark.parametrize("method", ["range_finder", "svd"])
@pytest.mark.parametrize("shape,side", [((60, 40), "right"), ((40, 60), "left"), ((60, 40), "left")])
def test_basis_is_orthonormal_with_expected_shape(shape, side, method):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    basis = refresh_basis(grad, 8, side, method=method)
    assert basis.shape == lowrank_shapes(shape, 8, side)[0]
    gram = basis.T @ basis if side == "left" else basis @ basis.T
    torch.testing.assert_close(gram, torch.eye(8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_range_finder_captures_top_energy(side):
    grad = decaying(120, 80) if side == "right" else decaying(80, 120)
    basis = refresh_basis(grad, 10, side, power_iters=1, generator=torch.Generator().manual_seed(0))
    assert captured(grad, basis, side) >= 0.95 * top_energy(grad, 10)


def test_svd_method_spans_top_singular_vectors():
    grad = decaying(50, 30)
    q = refresh_basis(grad, 5, "right", method="svd")
    v = torch.linalg.svd(grad).Vh[:5]
    torch.testing.assert_close(q.T @ q, v.T @ v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_warm_start_at_least_as_good_as_cold(side):
    shape = (120, 80) if side == "right" else (80, 120)
    gen = torch.Generator().manual_seed(3)
    old = decaying(*shape, seed=1, decay=0.9)
    prev = refresh_basis(old, 10, side, generator=gen)
    for seed in range(3):
        new = old + 0.02 * torch.randn(shape, generator=gen)  # the gradient drifts between refreshes
        warm = refresh_basis(new, 10, side, prev=prev, power_iters=1)
        cold = refresh_basis(new, 10, side, power_iters=1, generator=torch.Generator().manual_seed(seed))
        assert captured(new, warm, side) >= captured(new, cold, side) - 1e-6
        assert captured(new, warm, side) >= 0.97 * top_energy(new, 10)


def test_project_and_back_are_the_galore_products():
    gen = torch.Generator().manual_seed(2)
    grad = torch.randn(30, 20, generator=gen)
    low_l, low_r = torch.randn(4, 20, generator=gen), torch.randn(30, 4, generator=gen)
    p, q = refresh_basis(grad, 4, "left"), refresh_basis(grad, 4, "right")
    torch.testing.assert_close(project(grad, p, "left"), p.T @ grad)
    torch.testing.assert_close(project(grad, q, "right"), grad @ q.T)
    torch.testing.assert_close(project_back(low_l, p, "left"), p @ low_l)
    torch.testing.assert_close(project_back(low_r, q, "right"), low_r @ q)
    # a matrix inside the subspace survives the round trip
    inside = p @ p.T @ grad
    torch.testing.assert_close(project_back(project(inside, p, "left"), p, "left"), inside, atol=1e-5, rtol=0)
    assert lowrank_shapes((30, 20), 4, "left") == (p.shape, project(grad, p, "left").shape)
    assert lowrank_shapes((30, 20), 4, "right") == (q.shape, project(grad, q, "right").shape)


def test_dtypes_and_reproducibility():
    grad = torch.randn(20, 10, generator=torch.Generator().manual_seed(4))
    assert refresh_basis(grad.double(), 3, "right").dtype == torch.float64
    assert refresh_basis(grad.bfloat16(), 3, "right").dtype == torch.float32
    a = refresh_basis(grad, 3, "right", generator=torch.Generator().manual_seed(7))
    b = refresh_basis(grad, 3, "right", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="method must be"):
        refresh_basis(grad, 3, "right", method="qr")
