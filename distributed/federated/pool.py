"""A pool of client actors: one Ray actor per CPU (or GPU) slot, each running many virtual clients in
turn (as Flower's simulation engine does), never one process per client.

Each actor loads the workload (data, partition) once and keeps one model whose weights every client
round overwrites with the server's. The pool hands a sampled client to whichever actor is free; a
client that raises is reported as failed, and so is one whose actor died, which is then replaced.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from curvtrain.distributed.federated.client import ClientResult

log = logging.getLogger("curvtrain.federated")


@ray.remote
class ClientActor:
    def __init__(self, cfg, threads: int):
        import torch

        from curvtrain.distributed.federated.workload import build_workload

        torch.set_num_threads(threads)
        self.cfg = cfg
        self.device = torch.device("cuda", 0) if cfg.pool.use_gpu else torch.device("cpu")  # Ray shows one GPU
        self.workload = build_workload(cfg)
        self.model = self.workload.build_model().to(self.device)  # initial weights unused: each round loads xᵗ
        self.algorithm = cfg.algorithm.build()

    def where(self) -> tuple[int, str]:
        """(process id, Ray node id) of this actor."""
        return os.getpid(), ray.get_runtime_context().get_node_id()

    def train(self, client: int, round_: int, lr: float, start, server_state, client_state) -> ClientResult:
        from curvtrain.distributed.federated.client import train_client
        from curvtrain.optim import build_optimizer

        local, device = self.cfg.local, self.device
        batches = [tuple(t.to(device) for t in batch) for batch in self.workload.client_batches(client, round_)]
        result = train_client(
            self.model, self.algorithm, build_optimizer(local.optimizer, self.model.named_parameters()),
            batches, self.workload.loss, start=start.to(device),
            server_state={k: v.to(device) for k, v in server_state.items()},
            client_state={k: v.to(device) for k, v in client_state.items()},
            lr=lr, steps=local.steps, grad_clip=local.grad_clip,
        )
        result.upload = {k: v.cpu() for k, v in result.upload.items()}
        result.state = {k: v.cpu() for k, v in result.state.items()}
        return result


class ActorPool:
    def __init__(self, cfg, size: int):
        self.cfg = cfg
        self.actors = [self._start() for _ in range(size)]

    def _start(self):
        p = self.cfg.pool
        return ClientActor.options(num_cpus=p.cpus_per_actor, num_gpus=1 if p.use_gpu else 0, max_restarts=0).remote(
            self.cfg, p.cpus_per_actor
        )

    def __len__(self) -> int:
        return len(self.actors)

    def describe(self) -> dict:
        """Per actor: its process id and the node it runs on (recorded in RUN_DIR/workers.json)."""
        where = ray.get([a.where.remote() for a in self.actors])
        return {"pids": [pid for pid, _ in where], "nodes": [{"node_id": node} for _, node in where]}

    def run(self, clients: list[int], submit: Callable[[object, int], ray.ObjectRef]) -> tuple[dict[int, ClientResult], dict[int, str]]:
        """Train `clients`, one at a time per actor: submit(actor, client) starts one. Returns (results,
        failures), each keyed by client; a failure's value says why (logged as a warning)."""
        queue, idle = deque(clients), list(range(len(self.actors)))
        running: dict[ray.ObjectRef, tuple[int, int]] = {}
        results: dict[int, ClientResult] = {}
        failures: dict[int, str] = {}
        while queue or running:
            while queue and idle:
                slot, client = idle.pop(), queue.popleft()
                running[submit(self.actors[slot], client)] = (slot, client)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            slot, client = running.pop(ref)
            try:
                results[client] = ray.get(ref)
            except RayActorError as e:
                failures[client] = f"actor died ({str(e).splitlines()[0]})"
                log.warning("client %d dropped from the round: its actor died; starting a replacement actor", client)
                self.actors[slot] = self._start()
            except RayTaskError as e:
                cause = e.cause if e.cause is not None else e
                failures[client] = f"{type(cause).__name__}: {cause}"
                log.warning("client %d dropped from the round: %s", client, failures[client])
            idle.append(slot)
        return results, failures

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
