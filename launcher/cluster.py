"""Start or join the Ray runtime the coordinator runs on."""
from __future__ import annotations

import os


def connect(address: str | None, *, num_cpus_needed: int, num_gpus_needed: int = 0,
            object_store_bytes: int = 256 * 1024**2) -> bool:
    """Join the cluster at `address`, or start a local runtime bound to loopback. Returns True if local.

    The local runtime offers at least the CPUs the workers ask for (oversubscribing small machines
    rather than waiting forever), has no dashboard and an object store of `object_store_bytes`: small
    for pretraining (no large objects move), sized by `federate` for the model deltas in flight.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address.startswith("127.0.0.1")
    if address:
        ray.init(address=address, log_to_driver=True)
        available = ray.cluster_resources()
        if available.get("CPU", 0) < num_cpus_needed or available.get("GPU", 0) < num_gpus_needed:
            raise RuntimeError(
                f"the Ray cluster at {address} offers {available.get('CPU', 0):g} CPUs and "
                f"{available.get('GPU', 0):g} GPUs; the workers need {num_cpus_needed} CPUs and {num_gpus_needed} GPUs"
            )
        return False
    ray.init(
        num_cpus=max(os.cpu_count() or 1, num_cpus_needed),
        num_gpus=num_gpus_needed or None,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=object_store_bytes,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
    return True
