"""The coordinator: the Ray driver's plan for a pretraining run.

It checks everything it can before any worker starts (run directory, checkpoint to resume, corpus),
starts a group of `TrainWorker` actors, and restarts the whole group from the last sealed checkpoint
when a worker process dies (up to workers.max_restarts times). A Python exception inside a worker is
not retried: it would happen again; it is raised here as `RunFailed` with the worker's traceback, never
as the worker's own exception type (Ray's re-raised error subclasses it, so a ValueError in a worker
would read like bad input). Bad input is what `check` raises, before any worker starts.
"""
from __future__ import annotations

import json
from pathlib import Path

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from curvtrain.distributed import checkpoint, placement, progress
from curvtrain.distributed.config import TrainConfig, config_to_dict, save_config
from curvtrain.distributed.health import Diverged
from curvtrain.distributed.metrics import plot_losses, truncate_metrics
from curvtrain.distributed.distributor import distributor_for
from curvtrain.distributed.engine import build_model_and_optimizer
from curvtrain.distributed.worker import TrainWorker
from curvtrain.models.data import model_config, prepare_tokens


class RunFailed(RuntimeError):
    """The run failed after its workers started; the run directory keeps its last sealed checkpoint."""


class WorkerLost(RunFailed):
    """A worker process died; the group must be restarted."""


class WorkerGroup:
    """num_workers actors, one rank each, gang-scheduled in one placement group and killed together."""

    def __init__(self, cfg: TrainConfig, *, local: bool):
        w = cfg.workers
        env = {"DS_ACCELERATOR": "cuda" if w.use_gpu else "cpu", **progress.driver_env()}
        if local:
            env["GLOO_SOCKET_IFNAME"] = "lo"  # a local runtime keeps all traffic on loopback
        self.local = local
        self.placement = placement.reserve(w)
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

    def run(self, cfg: TrainConfig, run_dir: Path, resume_from: Path | None, owners: dict[str, int] | None) -> dict:
        master = ray.get(self.workers[0].rendezvous_address.remote(self.local))
        refs = [w.run.remote(cfg, str(run_dir), master, resume_from and str(resume_from), owners) for w in self.workers]
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
                raise RunFailed(f"an exception in a worker; its traceback (most recent call last):\n{e}") from None
        return ray.get(refs[0])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        ray.util.remove_placement_group(self.placement)


class Coordinator:
    def __init__(self, cfg: TrainConfig, run_dir: Path, *, resume: bool = False, local: bool = True):
        self.cfg, self.run_dir, self.resume, self.local = cfg, Path(run_dir), resume, local
        self.ckpt_root = self.run_dir / "checkpoints"
        self.checked = False  # check() passed; resume_from and owners are what it found
        self.resume_from: Path | None = None
        self.owners: dict[str, int] | None = None

    def check(self) -> Path | None:
        """Everything that can fail before workers start; returns the checkpoint to resume from."""
        resume_from = checkpoint.to_resume(self.run_dir, self.resume)
        if resume_from is not None:
            self.check_checkpoint(resume_from)
        model_config(self.cfg.model.name, self.cfg.data, self.cfg.model.vocab_size)  # the tokenizer fits the model
        prepare_tokens(self.cfg.data)  # corpus and tokenizer problems surface here, and workers hit the cache
        self.owners = self.ownership_plan()  # builds the optimizer on a meta model: bad ranks/targets fail here
        self.checked, self.resume_from = True, resume_from
        return resume_from

    def check_checkpoint(self, ckpt: Path) -> None:
        manifest = checkpoint.validate(ckpt)
        checkpoint.check_settings(ckpt, config_to_dict(self.cfg))  # the same model and optimizer settings
        distributor = distributor_for(self.cfg)
        distributor.check_checkpoint(manifest, ckpt, self.cfg)
        distributor.prepare_resume(manifest, ckpt, self.cfg)

    def run(self) -> dict:
        resume_from = self.resume_from if self.checked else self.check()
        placement.check_fits(placement.cluster_nodes(), self.cfg.workers)  # never wait for what cannot come
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        for attempt in range(self.cfg.workers.max_restarts + 1):
            # records after the checkpoint we start from will be written again
            truncate_metrics(self.run_dir, checkpoint.step_of(resume_from) if resume_from else 0)
            checkpoint.remove_unsealed(self.ckpt_root)
            group = WorkerGroup(self.cfg, local=self.local)
            try:
                (self.run_dir / "workers.json").write_text(json.dumps({"attempt": attempt, **group.describe()}))
                summary = group.run(self.cfg, self.run_dir, resume_from, self.owners)
                break
            except WorkerLost as e:
                if attempt == self.cfg.workers.max_restarts:
                    raise
                resume_from = checkpoint.latest(self.ckpt_root)
                if resume_from is not None:
                    self.check_checkpoint(resume_from)
                print(f"[curvtrain] worker lost ({e}); restarting from {resume_from or 'the start'} "
                      f"(restart {attempt + 1} of {self.cfg.workers.max_restarts})", flush=True)
            finally:
                group.shutdown()
        summary["run_dir"] = str(self.run_dir)
        summary["plot"] = str(plot_losses(self.run_dir))
        summary["checkpoint"] = str(checkpoint.latest(self.ckpt_root))
        return summary

    def ownership_plan(self) -> dict[str, int] | None:
        """Which rank owns which parameter, where the distributor has owners (planned on a meta-device model,
        which also builds the optimizer: bad ranks or targets fail here, before any worker starts)."""
        model, rule = build_model_and_optimizer(self.cfg, torch.device("meta"))
        return distributor_for(self.cfg).plan(model, rule, self.cfg)
