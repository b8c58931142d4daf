"""Gang scheduling of the worker group: one Ray placement group, and whether the cluster can ever hold it.

Each worker is one bundle, {CPU: workers.cpus_per_worker, GPU: 1 if workers.use_gpu}. The placement group
reserves every bundle at once, so the workers start together or not at all: no rank waits in a
collective for a peer that never got its cores. Rank r runs in bundle r. `workers.placement` says where
the bundles go:

    PACK           fewest nodes first    node A: [r0 r1 r2 r3]  node B: [ ]     GPUs share a node's links
    SPREAD         one per node first    node A: [r0 r2]        node B: [r1 r3]
    STRICT_PACK    one node, or never
    STRICT_SPREAD  a node each, or never

Ray keeps a placement group it can never place pending forever (and would keep the run waiting without a
word). `check_fits` compares the bundles with each node's total resources first, so a request the cluster
cannot hold fails at once, naming the numbers; one that fits but finds the cluster busy waits, saying so.
An elastic run (workers.min_workers < num_workers) needs only min_workers to fit; `placeable` says how many
of its workers the live nodes hold, and `reserve` gives up a reservation once they no longer hold it all (a
node died: Ray takes some seconds to mark it dead, while the reservation waits).
"""
from __future__ import annotations

import time

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table

from curvtrain.distributed.config import WorkersConfig


class ClusterTooSmall(ValueError):
    """The workers ask for more CPUs or GPUs than the cluster's nodes can hold under the placement strategy."""


def worker_bundle(w: WorkersConfig) -> dict[str, float]:
    """The resources one worker reserves (Ray refuses zero amounts in a bundle, so no GPU key on CPU)."""
    return {"CPU": float(w.cpus_per_worker), **({"GPU": 1.0} if w.use_gpu else {})}


def bundles_fit(nodes: dict[str, dict[str, float]], bundle: dict[str, float], count: int, strategy: str) -> int:
    """How many of `count` identical bundles the nodes (name → total resources) hold under `strategy`."""
    per_node = [min(int(resources.get(r, 0.0) // need) for r, need in bundle.items()) for resources in nodes.values()]
    if strategy == "STRICT_PACK":
        return min(count, max(per_node, default=0))
    if strategy == "STRICT_SPREAD":
        return min(count, sum(1 for k in per_node if k > 0))
    return min(count, sum(per_node))  # PACK and SPREAD only prefer a layout


def check_fits(nodes: dict[str, dict[str, float]], w: WorkersConfig) -> None:
    """Raise ClusterTooSmall, with every node's CPUs and GPUs, if not even workers.min_workers (= num_workers
    unless elastic) of the workers can ever be placed."""
    bundle = worker_bundle(w)
    fit = bundles_fit(nodes, bundle, w.num_workers, w.placement)
    if fit >= w.min_workers:
        return
    field, need = ("num_workers", w.num_workers) if w.min_workers == w.num_workers else ("min_workers", w.min_workers)
    each = " + ".join(f"{v:g} {k}" for k, v in bundle.items())
    offers = "; ".join(f"{name}: {r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU" for name, r in nodes.items())
    total = {k: sum(r.get(k, 0.0) for r in nodes.values()) for k in ("CPU", "GPU")}
    raise ClusterTooSmall(
        f"workers.{field}={need} workers of {each} each (workers.placement={w.placement}) need "
        f"{need * w.cpus_per_worker} CPUs and {need if w.use_gpu else 0} GPUs; the Ray cluster's "
        f"{len(nodes)} node{'s' if len(nodes) != 1 else ''} ({offers}; total {total['CPU']:g} CPUs, "
        f"{total['GPU']:g} GPUs) hold {fit} of them"
    )


def placeable(w: WorkersConfig) -> int:
    """How many of the num_workers workers the connected cluster's live nodes hold."""
    return bundles_fit(cluster_nodes(), worker_bundle(w), w.num_workers, w.placement)


def cluster_nodes() -> dict[str, dict[str, float]]:
    """The live nodes of the connected cluster: "ip (node id)" → total resources."""
    return {f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": n["Resources"] for n in ray.nodes() if n["Alive"]}


def reserve(w: WorkersConfig) -> PlacementGroup | None:
    """Reserve every worker's bundle at once; while the cluster is busy, wait and say so each minute. None
    (nothing left reserved) once the live nodes no longer hold all num_workers: a node died meanwhile."""
    group = placement_group([worker_bundle(w)] * w.num_workers, strategy=w.placement)
    said = time.monotonic()
    while not ray.wait([group.ready()], timeout=2)[0]:  # each 2 s: are its nodes still alive?
        if placeable(w) < w.num_workers:
            ray.util.remove_placement_group(group)
            return None
        if time.monotonic() - said >= 60:
            said = time.monotonic()
            print(f"[curvtrain] waiting for the cluster to free {w.num_workers} × {worker_bundle(w)} "
                  f"(placement {w.placement}); other work holds them", flush=True)
    return group


def bundle_nodes(group: PlacementGroup) -> list[dict[str, str]]:
    """Per bundle (= rank), the node it was placed on: its id and IP address."""
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    placed = placement_group_table(group)["bundles_to_node_id"]
    return [{"node_id": placed[i], "ip": ips[placed[i]]} for i in range(len(placed))]
