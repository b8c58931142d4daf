"""Start or join the Ray runtime the coordinator runs on."""
from __future__ import annotations

import os
import secrets
from collections.abc import Mapping

_started_here: str | None = None
"""GCS address of the local runtime this process started (it holds the machine's address, not 127.0.0.1)."""


def connect(address: str | None, *, num_cpus_needed: int, num_gpus_needed: int = 0,
            object_store_bytes: int = 256 * 1024**2) -> bool:
    """Join the cluster at `address`, or start a local runtime. Returns True if local.

    Joining leaves authentication to the cluster and the environment (`RAY_AUTH_MODE`, `RAY_AUTH_TOKEN`,
    `RAY_AUTH_TOKEN_PATH` or ~/.ray/auth_token, as Ray reads them). The local runtime offers at least the
    CPUs the workers ask for (oversubscribing small machines rather than waiting forever), has no
    dashboard and an object store of `object_store_bytes`: small for pretraining (no large objects
    move), sized by `federate` for the model deltas in flight. Whether the workers fit the nodes is the
    coordinator's check (`distributed.placement`).
    """
    global _started_here
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address == _started_here
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    os.environ.update(local_auth_env(os.environ))
    context = ray.init(
        num_cpus=max(os.cpu_count() or 1, num_cpus_needed),
        num_gpus=num_gpus_needed or None,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=object_store_bytes,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
    _started_here = context.address_info["gcs_address"]
    return True


def local_auth_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment that makes a new local runtime authenticated with a token only it knows.

    A local runtime is started with node address 127.0.0.1, but Ray 2.60 advertises the machine's address,
    its gRPC servers (GCS, raylet, workers) listen on every interface and the dashboard agent's job API on
    the machine's address: unauthenticated, it runs code for anyone who reaches the machine. With `RAY_AUTH_MODE` unset, Ray ≥ 2.59 starts a
    local runtime in token mode; this supplies a fresh random token in `RAY_AUTH_TOKEN`, inherited by
    the runtime's processes and written nowhere (no ~/.ray/auth_token). A `RAY_AUTH_MODE` or
    `RAY_AUTH_TOKEN` the user set is kept (`RAY_AUTH_MODE=disabled` turns authentication off).
    """
    if "RAY_AUTH_MODE" in environ or "RAY_AUTH_TOKEN" in environ:
        return {}
    return {"RAY_AUTH_TOKEN": secrets.token_hex(32)}
