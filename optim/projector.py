"""The low-rank gradient projector shared by every low-rank optimizer (GaLore family).

GaLore (Zhao et al., ICML 2024) projects the gradient G (m×n) of a weight matrix onto the span of its
dominant singular vectors and runs Adam in that r-dimensional space:

    side "left"  (m < n):  P (m×r), orthonormal columns;  R = Pᵀ G (r×n);  back: P N (m×n)
    side "right" (m ≥ n):  Q (r×n), orthonormal rows;     R = G Qᵀ (m×r);  back: N Q (m×n)

The basis comes from a randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4) instead of
GaLore's full SVD: Y = A Ω for a Gaussian sketch Ω, q power iterations Y ← A (Aᵀ Y) with a QR after
every product, basis = qr(Y). A warm start uses the previous basis B as the sketch, Ω = Aᵀ B
(subspace iteration restarted where it stopped, as in PowerSGD's warm start; Vogels et al. 2019).

APOLLO (Zhu et al., MLSys 2025) projects with a random basis instead, entries N(0, 1/r), regenerated from a
seed (`random_basis`) so that state holds no basis at all; its scaling factors are norms along the
dimension the projection keeps (`channel_norms`, `scale_channels`).

Everything is a pure function of tensors, so optimizer state holds only the basis tensor.
The right side is handled as the left side of the transposed matrix: `_orient` is the one place
that looks at `side`.
"""

import math

import torch
from torch import Tensor

SIDES = ("left", "right")
METHODS = ("range_finder", "svd")


def choose_side(shape: tuple[int, int] | torch.Size, side: str = "auto") -> str:
    """GaLore's rule: the basis lives on the shorter dimension, "right" if m ≥ n else "left"."""
    if side == "auto":
        m, n = shape
        return "right" if m >= n else "left"
    if side not in SIDES:
        raise ValueError(f"side must be 'auto', 'left' or 'right', got {side!r}")
    return side


def _orient(x: Tensor, side: str) -> Tensor:
    """View `x` so that the projection is a left one: unchanged for "left", transposed for "right"."""
    if side == "left":
        return x
    if side == "right":
        return x.mT
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def lowrank_shapes(shape: tuple[int, int] | torch.Size, rank: int, side: str) -> tuple[torch.Size, torch.Size]:
    """Shapes of (basis, projected gradient) for a weight of `shape` at `rank` on `side` (no memory used)."""
    rows, cols = _orient(torch.empty(shape, device="meta"), side).shape
    basis, low = torch.empty(rows, rank, device="meta"), torch.empty(rank, cols, device="meta")
    return _orient(basis, side).shape, _orient(low, side).shape


def project(grad: Tensor, basis: Tensor, side: str) -> Tensor:
    """R = Pᵀ G (left) or G Qᵀ (right)."""
    return _orient(_orient(basis, side).mT @ _orient(grad, side), side)


def project_back(low: Tensor, basis: Tensor, side: str) -> Tensor:
    """P N (left) or N Q (right): the full-size matrix whose projection is `low`."""
    return _orient(_orient(basis, side) @ _orient(low, side), side)


def refresh_basis(
    grad: Tensor,
    rank: int,
    side: str,
    *,
    prev: Tensor | None = None,
    power_iters: int = 1,
    method: str = "range_finder",
    generator: torch.Generator | None = None,
) -> Tensor:
    """An orthonormal basis of the dominant rank-`rank` column ("left", m×r) or row ("right", r×n) space of `grad`.

    range_finder: Y = A Ω with Ω Gaussian (n×r), or Ω = Aᵀ·prev when `prev` is given (warm start);
    then `power_iters` times Y ← A qr(Aᵀ qr(Y)); basis = qr(Y).  svd: the top-r singular vectors of a
    full `torch.linalg.svd` (GaLore's original refresh). A = G for "left", Gᵀ for "right".
    Computed in float32, or float64 for a float64 gradient.
    """
    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    a = _orient(grad, side).to(dtype)
    if method == "svd":
        u = torch.linalg.svd(a, full_matrices=False).U[:, :rank]
    elif method == "range_finder":
        if prev is None:
            sketch = torch.randn(a.shape[1], rank, device=a.device, dtype=dtype, generator=generator)
        else:
            sketch = a.mT @ _orient(prev, side).to(dtype)
        y = a @ sketch
        for _ in range(power_iters):
            y = a @ torch.linalg.qr(a.mT @ torch.linalg.qr(y).Q).Q
        u = torch.linalg.qr(y).Q
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return _orient(u, side).contiguous()


def random_basis(shape: tuple[int, int] | torch.Size, rank: int, side: str, seed: int, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """A Gaussian basis of the shape `lowrank_shapes` gives, entries N(0, 1/rank), drawn from a generator seeded
    with `seed` on `device`: the same seed gives the same basis (APOLLO's projection, regenerated, not stored)."""
    basis_shape, _ = lowrank_shapes(shape, rank, side)
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn(basis_shape, generator=generator, device=device, dtype=dtype).div_(math.sqrt(rank))


def channel_norms(low: Tensor, side: str) -> Tensor:
    """Norms of a projected tensor along the projected dimension: one per column (left, low is r×n) or per
    row (right, low is m×r), i.e. one per channel of the dimension the projection keeps."""
    return torch.linalg.vector_norm(_orient(low, side), dim=0)


def scale_channels(x: Tensor, factors: Tensor, side: str) -> Tensor:
    """x (m×n) with each column (left) or row (right) multiplied by its entry of `factors`, in place."""
    _orient(x, side).mul_(factors)
    return x
