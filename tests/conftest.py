import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_runtime():
    """One local Ray runtime for the whole session (starting one costs seconds)."""
    import ray

    from launcher.cluster import connect

    connect(None, num_cpus_needed=2)
    yield
    ray.shutdown()
