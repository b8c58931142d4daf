"""The coordinator: the Ray driver's plan for a pretraining run.

It checks everything it can before any worker starts (run directory, checkpoint to resume, corpus),
starts a group of `TrainWorker` actors, and restarts the whole group from the last sealed checkpoint
when a worker process dies (up to workers.max_restarts times). A Python exception inside a worker is
not retried: it would happen again; it is raised here as `RunFailed` with the worker's traceback, never
as the worker's own exception type (Ray's re-raised error subclasses it, so a ValueError in a worker
would read like bad input). Bad input is what `check` raises, before any worker starts.

Elastic runs (workers.min_workers < num_workers): each group is as large as the live cluster holds, at
most num_workers and at least min_workers, with the global batch kept (`elastic_size`: the accumulation
makes up for fewer workers). So a run that lost a node for good goes on from its last sealed checkpoint
with fewer workers, and grows back to num_workers at a later restart once nodes return. Each change is a
record in RUN_DIR/metrics.jsonl, `{"step": S, "event": "workers", "num_workers": N, ...}` at the step S
the new group goes on from (it outlives the truncation of the records after S), and a printed line.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from curvtrain.distributed import checkpoint, placement, progress
from curvtrain.distributed.config import TrainConfig, config_to_dict, save_config
from curvtrain.distributed.health import Diverged
from curvtrain.distributed.metrics import METRICS, plot_losses, truncate_metrics
from curvtrain.distributed.distributor import distributor_for
from curvtrain.distributed.engine import build_model_and_optimizer
from curvtrain.distributed.worker import TrainWorker
from curvtrain.models.data import model_config, prepare_tokens


class RunFailed(RuntimeError):
    """The run failed after its workers started; the run directory keeps its last sealed checkpoint."""


class WorkerLost(RunFailed):
    """A worker process died; the group must be restarted."""


class TooFewWorkers(RunFailed):
    """The live cluster holds fewer workers than workers.min_workers (or no count from there up keeps the
    run's global batch)."""


PEER_DEATH_S = 60.0
"""How long a worker's communication error waits for Ray to report a dead peer. When a node dies, its
workers' peers fail at once in their next collective, while Ray reports those workers dead only once its
health checks mark the node dead (15-30 s): such an error is a lost worker, not one to stop the run for."""


def lost_a_peer(cause: BaseException) -> bool:
    """Whether a worker's exception is its process group losing a peer: a torch.distributed error, or
    gloo's TCP transport (a plain RuntimeError, "…gloo/transport/tcp/pair.cc… Connection closed by peer")."""
    return isinstance(cause, torch.distributed.DistError) or "gloo/transport" in str(cause)


def elastic_size(cfg: TrainConfig, fit: int) -> TrainConfig:
    """`cfg` with the most workers that the cluster holds (`fit`), at most workers.num_workers and at least
    workers.min_workers, for which the whole config validates: the global batch is kept (micro-batch ×
    workers × accumulation), so fewer workers accumulate more micro-batches. TooFewWorkers, naming the
    numbers, if there is no such count."""
    w = cfg.workers
    refused = []
    for n in range(min(fit, w.num_workers), w.min_workers - 1, -1):
        try:
            return dataclasses.replace(cfg, workers=dataclasses.replace(w, num_workers=n))
        except ValueError as e:
            refused.append(f"{n} workers: {e}")
    why = f"; the counts down to it do not fit the config ({'; '.join(refused)})" if refused else ""
    raise TooFewWorkers(f"the Ray cluster holds {fit} of workers.num_workers={w.num_workers} workers "
                        f"(workers.placement={w.placement}), and the run needs workers.min_workers={w.min_workers}{why}")


class WorkerGroup:
    """num_workers actors, one rank each, gang-scheduled in one placement group and killed together."""

    @classmethod
    def start(cls, cfg: TrainConfig, *, local: bool) -> WorkerGroup | None:
        """The group of cfg.workers, or None if a node died while its placement group waited."""
        reserved = placement.reserve(cfg.workers)
        return None if reserved is None else cls(cfg, reserved, local=local)

    def __init__(self, cfg: TrainConfig, reserved, *, local: bool):
        w = cfg.workers
        env = {"DS_ACCELERATOR": "cuda" if w.use_gpu else "cpu", **progress.driver_env()}
        if local:
            env["GLOO_SOCKET_IFNAME"] = "lo"  # a local runtime keeps all traffic on loopback
        self.cfg, self.local, self.placement = cfg, local, reserved
        self.workers = [
            TrainWorker.options(
                num_cpus=w.cpus_per_worker, num_gpus=1 if w.use_gpu else 0, runtime_env={"env_vars": env}, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank),
            ).remote(rank, w.num_workers, w.use_gpu, w.cpus_per_worker)
            for rank in range(w.num_workers)
        ]

    def describe(self) -> dict:
        """Per rank: the worker's process id and the node it runs on (recorded in RUN_DIR/workers.json)."""
        return {"pids": ray.get([w.pid.remote() for w in self.workers]), "nodes": placement.bundle_nodes(self.placement)}

    def run(self, run_dir: Path, resume_from: Path | None, owners: dict[str, int] | None) -> dict:
        master = ray.get(self.workers[0].rendezvous_address.remote(self.local))
        refs = [w.run.remote(self.cfg, str(run_dir), master, resume_from and str(resume_from), owners) for w in self.workers]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])  # raises at once if this worker failed; peers would hang in collectives
            except RayActorError as e:
                raise WorkerLost(str(e).splitlines()[0]) from e
            except Diverged as e:  # all ranks stopped at the same step; nothing non-finite was sealed
                raise Diverged(str(e.cause)) from None
            except RayTaskError as e:  # an exception inside a worker; str(e) holds its frames
                if lost_a_peer(e.cause) and (lost := self.lost_peer(pending)) is not None:
                    raise WorkerLost(f"{lost} (a peer's collective failed first)") from e
                raise RunFailed(f"an exception in a worker; its traceback (most recent call last):\n{e}") from None
        return ray.get(refs[0])

    @staticmethod
    def lost_peer(pending: list) -> str | None:
        """The first line of Ray's error for a worker of `pending` that died within PEER_DEATH_S, else None
        (returns as soon as one is reported, or when all have failed)."""
        deadline = time.monotonic() + PEER_DEATH_S
        while pending and (left := deadline - time.monotonic()) > 0:
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in done:
                try:
                    ray.get(ref)
                except RayActorError as e:
                    return str(e).splitlines()[0]
                except RayTaskError:  # this peer raised too
                    pass
        return None

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        ray.util.remove_placement_group(self.placement)


class Coordinator:
    def __init__(self, cfg: TrainConfig, run_dir: Path, *, resume: bool = False, local: bool = True):
        self.cfg, self.run_dir, self.resume, self.local = cfg, Path(run_dir), resume, local
        self.ckpt_root = self.run_dir / "checkpoints"
        self.checked = False  # check() passed; resume_from, owners and written_by are what it found
        self.resume_from: Path | None = None
        self.owners: dict[str, int] | None = None
        self.written_by = cfg.workers.num_workers  # the worker count of the checkpoint resumed from

    def check(self) -> Path | None:
        """Everything that can fail before workers start; returns the checkpoint to resume from."""
        resume_from = checkpoint.to_resume(self.run_dir, self.resume)
        if resume_from is not None:
            self.written_by = self.check_checkpoint(resume_from, self.cfg)
        model_config(self.cfg.model.name, self.cfg.data, self.cfg.model.vocab_size)  # the tokenizer fits the model
        prepare_tokens(self.cfg.data)  # corpus and tokenizer problems surface here, and workers hit the cache
        self.owners = self.ownership_plan()  # builds the optimizer on a meta model: bad ranks/targets fail here
        self.checked, self.resume_from = True, resume_from
        return resume_from

    def check_checkpoint(self, ckpt: Path, cfg: TrainConfig) -> int:
        """Raise CheckpointError unless run config `cfg` can resume checkpoint `ckpt`; returns its worker count."""
        manifest = checkpoint.validate(ckpt)
        checkpoint.check_settings(ckpt, config_to_dict(cfg))  # the same model and optimizer settings
        distributor = distributor_for(cfg)
        distributor.check_checkpoint(manifest, ckpt, cfg)
        distributor.prepare_resume(manifest, ckpt, cfg)
        return manifest["world_size"]

    def run(self) -> dict:
        resume_from = self.resume_from if self.checked else self.check()
        placement.check_fits(placement.cluster_nodes(), self.cfg.workers)  # never wait for what cannot come
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        running = self.written_by if resume_from else self.cfg.workers.num_workers
        for attempt in range(self.cfg.workers.max_restarts + 1):
            # records after the checkpoint we start from will be written again
            step = checkpoint.step_of(resume_from) if resume_from else 0
            truncate_metrics(self.run_dir, step)
            checkpoint.remove_unsealed(self.ckpt_root)
            group, owners = self.start_group(resume_from, checked=attempt == 0)
            if group.cfg.workers.num_workers != running:
                self.record_resize(step, running, group.cfg, resume_from)
                running = group.cfg.workers.num_workers
            try:
                (self.run_dir / "workers.json").write_text(json.dumps({"attempt": attempt, **group.describe()}))
                summary = group.run(self.run_dir, resume_from, owners)
                break
            except WorkerLost as e:
                if attempt == self.cfg.workers.max_restarts:
                    raise
                resume_from = checkpoint.latest(self.ckpt_root)
                print(f"[curvtrain] worker lost ({e}); restarting from {resume_from or 'the start'} "
                      f"(restart {attempt + 1} of {self.cfg.workers.max_restarts})", flush=True)
            finally:
                group.shutdown()
        summary["run_dir"] = str(self.run_dir)
        summary["plot"] = str(plot_losses(self.run_dir))
        summary["checkpoint"] = str(checkpoint.latest(self.ckpt_root))
        return summary

    def start_group(self, resume_from: Path | None, *, checked: bool) -> tuple[WorkerGroup, dict[str, int] | None]:
        """The largest group the live cluster holds (`elastic_size`) and its ownership plan. A node that died
        but is not yet marked dead keeps the reservation waiting until Ray marks it; then a smaller group is
        chosen. `checked`: check() already vouched for `resume_from` at workers.num_workers."""
        while True:
            cfg = elastic_size(self.cfg, placement.placeable(self.cfg.workers))
            if resume_from is not None and not (checked and cfg.workers == self.cfg.workers):
                try:
                    self.check_checkpoint(resume_from, cfg)
                except checkpoint.CheckpointError as e:
                    raise RunFailed(f"the cluster now holds {cfg.workers.num_workers} workers, but: {e}") from None
            owners = self.owners if cfg.workers == self.cfg.workers else self.ownership_plan(cfg)
            group = WorkerGroup.start(cfg, local=self.local)
            if group is not None:
                return group, owners

    def record_resize(self, step: int, was: int, cfg: TrainConfig, resume_from: Path | None) -> None:
        """The change of worker count, in RUN_DIR/metrics.jsonl at the step the new group goes on from, and printed."""
        w, b = cfg.workers, cfg.batch
        record = {"step": step, "event": "workers", "num_workers": w.num_workers, "was": was,
                  "grad_accum": cfg.grad_accum, "target": self.cfg.workers.num_workers}
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[curvtrain] workers: {was} → {w.num_workers}, the most the live cluster holds of workers.num_workers="
              f"{self.cfg.workers.num_workers} (workers.min_workers={w.min_workers}); the global batch of "
              f"{b.global_batch_size} stays: {b.micro_batch_size} × {w.num_workers} workers × {cfg.grad_accum} "
              f"micro-batches; going on from {resume_from or 'the start'}", flush=True)

    def ownership_plan(self, cfg: TrainConfig | None = None) -> dict[str, int] | None:
        """Which rank owns which parameter, where the distributor has owners (planned on a meta-device model,
        which also builds the optimizer: bad ranks or targets fail here, before any worker starts), for
        `cfg`'s worker count (default: the run's)."""
        cfg = cfg or self.cfg
        model, rule = build_model_and_optimizer(cfg, torch.device("meta"))
        return distributor_for(cfg).plan(model, rule, cfg)
