"""Gang scheduling plan: how many identical worker bundles a cluster's nodes hold under each Ray placement
strategy, checked against brute force over every assignment of bundles to nodes."""
from __future__ import annotations

import itertools
import random

import pytest

from curvtrain.distributed.config import PLACEMENT_STRATEGIES, WorkersConfig
from curvtrain.distributed.placement import ClusterTooSmall, bundles_fit, check_fits, worker_bundle


def placeable(nodes: list[dict], bundle: dict, k: int, strategy: str) -> bool:
    """Some assignment of k bundles to nodes respects every node's resources and the strategy."""
    for assignment in itertools.product(range(len(nodes)), repeat=k):
        if strategy == "STRICT_PACK" and len(set(assignment)) > 1:
            continue
        if strategy == "STRICT_SPREAD" and len(set(assignment)) < k:
            continue
        if all(assignment.count(i) * need <= node.get(r, 0) for i, node in enumerate(nodes) for r, need in bundle.items()):
            return True
    return False


@pytest.mark.parametrize("strategy", PLACEMENT_STRATEGIES)
def test_bundles_fit_equals_brute_force(strategy):
    rng = random.Random(0)
    for _ in range(150):
        nodes = [{"CPU": float(rng.randint(0, 4)), "GPU": float(rng.randint(0, 2))} for _ in range(rng.randint(1, 3))]
        bundle = {"CPU": float(rng.randint(1, 2)), **({"GPU": 1.0} if rng.random() < 0.5 else {})}
        count = rng.randint(1, 4)
        expected = max(k for k in range(count + 1) if k == 0 or placeable(nodes, bundle, k, strategy))
        assert bundles_fit({str(i): n for i, n in enumerate(nodes)}, bundle, count, strategy) == expected, (nodes, bundle, count)


def test_too_small_cluster_is_named_with_its_numbers():
    nodes = {"10.0.0.1 (a)": {"CPU": 2.0}, "10.0.0.2 (b)": {"CPU": 2.0, "GPU": 1.0}}
    check_fits(nodes, WorkersConfig(num_workers=4, placement="SPREAD"))  # fits: returns
    with pytest.raises(ClusterTooSmall, match=r"workers\.num_workers=3 .*STRICT_PACK.* need 3 CPUs and 0 GPUs.*"
                       r"10\.0\.0\.1 \(a\): 2 CPU, 0 GPU; 10\.0\.0\.2 \(b\): 2 CPU, 1 GPU; total 4 CPUs, 1 GPUs\) hold 2 of them"):
        check_fits(nodes, WorkersConfig(num_workers=3, placement="STRICT_PACK"))
    with pytest.raises(ClusterTooSmall, match=r"need 4 CPUs and 2 GPUs.* hold 1 of them"):
        check_fits(nodes, WorkersConfig(num_workers=2, use_gpu=True, cpus_per_worker=2))


def test_bundle_and_config():
    assert worker_bundle(WorkersConfig(cpus_per_worker=3)) == {"CPU": 3.0}  # no zero GPU: Ray refuses it
    assert worker_bundle(WorkersConfig(use_gpu=True)) == {"CPU": 1.0, "GPU": 1.0}
    with pytest.raises(ValueError, match="placement must be one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD, got 'pack'"):
        WorkersConfig(placement="pack")
