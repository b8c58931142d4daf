"""Partitions and client sampling: pure plans, checked without processes."""
import numpy as np
import pytest

from curvtrain.distributed.federated import partition


def labels(n=3000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def covers_once(parts, n):
    every = np.concatenate(parts)
    return len(every) == n and np.array_equal(np.sort(every), np.arange(n))


@pytest.mark.parametrize("alpha", [0.05, 0.3, 100.0])
def test_dirichlet_covers_every_sample_exactly_once(alpha):
    y = labels()
    parts = partition.dirichlet(y, 100, alpha, seed=1)
    assert covers_once(parts, len(y))
    assert sorted({len(p) for p in parts}) == [30]  # equal shares
    # small α concentrates each client on few labels; large α is close to the global mix
    top = np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts])
    if alpha < 0.1:
        assert top > 0.6
    if alpha > 10:
        assert top < 0.35


def test_partitions_are_reproducible_from_the_seed():
    y = labels()
    a, b, c = (partition.dirichlet(y, 50, 0.3, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))
    assert partition.sample_clients(1000, 10, 3, 5) == partition.sample_clients(1000, 10, 3, 5)
    assert partition.sample_clients(1000, 10, 3, 5) != partition.sample_clients(1000, 10, 3, 6)


def test_iid_classes_and_documents_cover_once():
    y = labels(1001)
    assert covers_once(partition.iid(1001, 7, seed=0), 1001)
    parts = partition.classes(y, 20, 2, seed=0)
    assert covers_once(parts, 1001)
    assert all(len(np.unique(y[p])) <= 2 for p in parts)
    docs = partition.documents(10, 3)
    assert [list(d) for d in docs] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_impossible_partitions_name_the_problem():
    with pytest.raises(ValueError, match="num_clients"):
        partition.iid(5, 6, seed=0)
    with pytest.raises(ValueError, match="classes per client"):
        partition.classes(labels(), 3, 2, seed=0)
