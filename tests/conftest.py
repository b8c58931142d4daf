import os
from pathlib import Path

import pytest

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
    """One local Ray runtime for the whole session (starting one costs seconds), with 3 CPU slots: the
    3-worker tests oversubscribe a 2-core machine, as a local runtime does for any run that asks for more."""
    import ray

    from curvtrain.launcher.cluster import connect

    connect(None, num_cpus_needed=3)
    yield
    ray.shutdown()


CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def tiny(*overrides: str):
    """The test recipe (configs/tiny.yaml) with `--set`-style overrides."""
    from curvtrain.distributed.config import TrainConfig
    from curvtrain.launcher.config import load_config

    return load_config(TrainConfig, CONFIG, list(overrides))


def trainer_in_gloo_group(rank: int, world: int, store_dir: str, *overrides: str):
    """The `Trainer` of rank `rank` of a real gloo group of `world` processes (meeting in `store_dir`), as a
    Ray worker builds it, for tests that drive `train_step` themselves (call it in an mp.spawn child)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from curvtrain.distributed.coordinator import Coordinator
    from curvtrain.distributed.trainer import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(store_dir, "store"), world), rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = tiny(*overrides)
    run_dir = os.path.join(store_dir, "run")
    return Trainer(cfg, run_dir, torch.device("cpu"), Coordinator(cfg, run_dir).ownership_plan())


def losses(run_dir: Path) -> list[float]:
    from curvtrain.distributed.metrics import read_metrics

    return [r["loss"] for r in read_metrics(run_dir)]


@pytest.fixture(scope="session")
def runs(ray_runtime, tmp_path_factory):
    """runs(*overrides) → the run directory of a finished tiny run of that configuration (each run once)."""
    from curvtrain.distributed.coordinator import Coordinator

    done: dict[tuple, Path] = {}

    def get(*overrides: str) -> Path:
        if overrides not in done:
            run_dir = tmp_path_factory.mktemp("run")
            Coordinator(tiny(*overrides), run_dir).run()
            done[overrides] = run_dir
        return done[overrides]

    return get


def resume_from_step_10(full: Path, out: Path, *overrides: str) -> Path:
    """A copy of the finished 20-step run `full` taken back to right after step 10 (the later checkpoint
    dropped, LATEST pointing at step 10), then resumed to the end with `overrides`: `out`."""
    import shutil

    from curvtrain.distributed.coordinator import Coordinator

    shutil.copytree(full, out)
    shutil.rmtree(out / "checkpoints" / "step_00000020")
    (out / "checkpoints" / "LATEST").write_text("step_00000010")
    Coordinator(tiny(*overrides), out, resume=True).run()
    return out
