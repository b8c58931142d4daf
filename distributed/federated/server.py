"""The federated server (coordinator): the Ray driver's loop over communication rounds.

    round t:  sample clients (seeded) → the actor pool trains them from xᵗ → aggregate the results in
              client order → server update → write the clients' new states to the store → evaluate
              → log → checkpoint every run.checkpoint_interval rounds

Everything that can fail before Ray starts is checked in `check()` (run directory, the checkpoint to
resume, the data files), and nothing is written until it passes. A client that raises or loses its
actor is dropped from its round; a round with fewer than clients.min_clients results is retried with a
fresh sample. A client round depends only on (xᵗ, server state, client state, client, round), so the
result does not depend on which actor ran what, and a resumed run continues exactly.

Checkpoint layout (RUN_DIR/checkpoints/step_<round>/, sealed by distributed.checkpoint's manifest and
LATEST; weights-only: safetensors and JSON, no pickles):

    model.safetensors       the global model (named as the model's state dict)
    server.safetensors      the server's state vectors (SCAFFOLD's c, FedSpeed's ḡ)
    server.json             round, algorithm, clients, parameter count
    client_state/           hard links to the client-state store's files at that round
    config.yaml
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import ray
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from curvtrain.distributed import checkpoint
from curvtrain.distributed.config import save_config
from curvtrain.distributed.coordinator import RunFailed
from curvtrain.distributed.federated.algorithms import load_flat, mean_of
from curvtrain.distributed.federated.config import FederatedConfig
from curvtrain.distributed.federated.partition import sample_clients
from curvtrain.distributed.federated.pool import ActorPool
from curvtrain.distributed.federated.store import ClientStateStore
from curvtrain.distributed.federated.workload import build_workload
from curvtrain.distributed.metrics import MetricsLogger, plot_series, truncate_metrics
from curvtrain.distributed.progress import progress_bar

log = logging.getLogger("curvtrain.federated")


class RoundFailed(RunFailed):
    """A round got fewer than clients.min_clients results in every attempt."""


class FederatedServer:
    def __init__(self, cfg: FederatedConfig, run_dir: Path, *, resume: bool = False):
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.ckpt_root = self.run_dir / "checkpoints"
        self.algorithm = cfg.algorithm.build()
        self.checked = False
        self.round = 0  # rounds completed

    # ---- before Ray starts ----
    def check(self) -> None:
        """Run directory, resume checkpoint and data: every problem raised here, nothing written."""
        resume_from = checkpoint.to_resume(self.run_dir, self.resume)
        if resume_from is not None:
            checkpoint.validate(resume_from)
        self.workload = build_workload(self.cfg)  # a missing data file fails here
        torch.manual_seed(self.cfg.run.seed)
        self.model = self.workload.build_model()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.x = torch.nn.utils.parameters_to_vector(self.params).detach().clone()
        self.server_state = {k: torch.zeros_like(self.x) for k in self.algorithm.server_state}
        self.store = ClientStateStore(self.run_dir / "client_state", self.algorithm.client_state, self.x.numel())
        self.resume_from = resume_from
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self.checked = True

    @property
    def model_bytes(self) -> int:
        return self.x.numel() * self.x.element_size()

    def num_actors(self) -> int:
        """pool.num_actors, or one per cpus_per_actor CPUs (GPUs) of the Ray cluster."""
        p = self.cfg.pool
        if p.num_actors:
            return p.num_actors
        resources = ray.cluster_resources()
        return max(1, int(resources.get("GPU", 0)) if p.use_gpu else int(resources.get("CPU", 1)) // p.cpus_per_actor)

    # ---- the loop ----
    def run(self) -> dict:
        if not self.checked:
            self.check()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        if self.resume_from is not None:
            self.store.restore(self.resume_from / "client_state")
        else:  # a fresh run (check() found no checkpoint): states of an earlier, unsaved attempt are void
            shutil.rmtree(self.store.root, ignore_errors=True)
        truncate_metrics(self.run_dir, self.round, step_key="round")
        checkpoint.remove_unsealed(self.ckpt_root)
        pool = ActorPool(self.cfg, self.num_actors())
        logger = MetricsLogger(self.run_dir, start_step=self.round, step_key="round")
        bar = progress_bar(self.round, self.cfg.run.rounds, desc=f"federate {self.cfg.algorithm.name}", unit="round")
        start, summary = time.perf_counter(), {}
        try:
            (self.run_dir / "workers.json").write_text(json.dumps(pool.describe()))
            while self.round < self.cfg.run.rounds:
                record = self.run_round(pool)
                record["elapsed_s"] = time.perf_counter() - start
                logger.log(record)
                summary.update(record)
                bar.set_postfix({k: f"{record[k]:.4f}" for k in ("test_loss", "test_accuracy") if k in record})
                bar.update(1)
                if self.round % self.cfg.run.checkpoint_interval == 0 or self.round == self.cfg.run.rounds:
                    self.save_checkpoint(len(pool))
        finally:
            bar.close()
            logger.close()
            pool.shutdown()
        summary.update(run_dir=str(self.run_dir), plots=[str(p) for p in plot_rounds(self.run_dir)],
                       checkpoint=str(checkpoint.latest(self.ckpt_root)))
        return summary

    def run_round(self, pool: ActorPool) -> dict:
        """Round t = self.round: train a sample of clients, aggregate, update; returns the metrics record."""
        cfg, t = self.cfg, self.round
        began = time.perf_counter()
        lr = cfg.local.optimizer.lr * cfg.local.lr_decay ** t
        start, server_state = ray.put(self.x), ray.put(self.server_state)
        dropped: dict[int, str] = {}
        for attempt in range(cfg.clients.max_retries + 1):
            clients = sample_clients(cfg.clients.num_clients, cfg.clients.per_round, cfg.run.seed, t, attempt)
            results, failures = pool.run(clients, lambda actor, c: self.dispatch(actor, c, t, lr, start, server_state))
            dropped.update(failures)
            if len(results) >= cfg.clients.min_clients:
                break
            log.warning("round %d: %d of %d clients returned, fewer than clients.min_clients=%d; retrying with a fresh sample",
                        t + 1, len(results), len(clients), cfg.clients.min_clients)
        else:
            raise RoundFailed(f"round {t + 1}: fewer than clients.min_clients={cfg.clients.min_clients} results in "
                              f"{cfg.clients.max_retries + 1} attempts; last failures: {failures}")
        done = sorted(results)  # a fixed summation order: the same bits whichever actor finished first
        mean = mean_of([results[c].upload for c in done])
        self.x, self.server_state = self.algorithm.server_update(self.x, self.server_state, mean, len(done) / cfg.clients.num_clients)
        for c in done:
            self.store.put(c, results[c].state)
        self.round += 1
        seconds = time.perf_counter() - began
        record = {
            "round": self.round,
            "clients": len(done),
            "dropped": sorted(dropped),
            "train_loss": sum(results[c].loss for c in done) / len(done),
            "lr": lr,
            "round_s": seconds,
            "client_updates_per_s": len(done) / seconds,
            "client_state_bytes": sum(v.numel() * v.element_size() for c in done for v in results[c].state.values()),
        }
        if self.round % cfg.run.eval_interval == 0 or self.round == cfg.run.rounds:
            load_flat(self.params, self.x)
            record.update(self.workload.evaluate(self.model))
            record["eval_s"] = time.perf_counter() - began - seconds
        return record

    def dispatch(self, actor, client: int, round_: int, lr: float, start, server_state) -> ray.ObjectRef:
        """Start one client's local round on `actor` (its state read from the store just now)."""
        return actor.train.remote(client, round_, lr, start, server_state, self.store.get(client))

    # ---- checkpoints ----
    def save_checkpoint(self, num_actors: int) -> Path:
        ckpt = self.ckpt_root / checkpoint.tag_for(self.round)
        ckpt.mkdir(parents=True, exist_ok=True)
        load_flat(self.params, self.x)
        save_model(self.model, str(ckpt / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in self.server_state.items()}, str(ckpt / "server.safetensors"))
        meta = {"round": self.round, "algorithm": self.cfg.algorithm.name, "num_clients": self.cfg.clients.num_clients,
                "parameters": self.x.numel()}
        (ckpt / "server.json").write_text(json.dumps(meta, indent=1))
        self.store.snapshot(ckpt / "client_state")
        save_config(self.cfg, ckpt / "config.yaml")
        checkpoint.write_manifest(ckpt, [], step=self.round, world_size=num_actors, zero_stage=0)  # the server hashes every file
        checkpoint.prune(self.ckpt_root, self.cfg.run.keep_checkpoints)
        return ckpt

    def load_checkpoint(self, ckpt: Path) -> None:
        meta = json.loads((ckpt / "server.json").read_text())
        expected = {"algorithm": self.cfg.algorithm.name, "num_clients": self.cfg.clients.num_clients, "parameters": self.x.numel()}
        for key, value in expected.items():
            if meta[key] != value:
                raise checkpoint.CheckpointError(f"checkpoint {ckpt} was written with {key}={meta[key]}, this run has {value}")
        load_model(self.model, str(ckpt / "model.safetensors"))
        self.x = torch.nn.utils.parameters_to_vector(self.params).detach().clone()
        state = load_file(str(ckpt / "server.safetensors"))
        self.server_state = {k: state[k] for k in self.algorithm.server_state}
        self.round = meta["round"]


def plot_rounds(run_dir: Path) -> list[Path]:
    """RUN_DIR/loss.png (test and mean client training loss) and, for classification, accuracy.png, vs round."""
    loss = {"test_loss": ("test loss", "o-"), "train_loss": ("train loss", "-")}
    paths = (plot_series(run_dir, "loss", "round", loss, "cross-entropy"),
             plot_series(run_dir, "accuracy", "round", {"test_accuracy": ("test accuracy", "o-")}, "test accuracy"))
    return [p for p in paths if p is not None]


def object_store_bytes(model_bytes: int, num_actors: int) -> int:
    """Object store for one round in flight: xᵗ and the server state, and per actor its client's state in
    and upload + state out (≤ 4 model-sized vectors), doubled for slack; at least Ray's 256 MiB minimum here."""
    return max(256 * 1024**2, math.ceil(2 * (2 + 4 * num_actors) * model_bytes))
