"""Elastic worker counts: which count a restart chooses (`elastic_size`), workers.min_workers, the placement
check of an elastic run, and the shared-RUN_DIR check on a real gloo group (one folder, then two)."""
from __future__ import annotations

import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny
from curvtrain.distributed.config import WorkersConfig
from curvtrain.distributed.coordinator import TooFewWorkers, elastic_size, lost_a_peer
from curvtrain.distributed.placement import ClusterTooSmall, check_fits
from curvtrain.distributed.shared_storage import MARKERS, SharedStorageError, check_shared_run_dir


def keeps_the_global_batch(cfg, n: int) -> bool:
    """Reference: n workers keep cfg's global batch with a whole number of micro-batches each."""
    b = cfg.batch
    return b.global_batch_size % (b.micro_batch_size * n) == 0


@pytest.mark.parametrize("global_batch, micro, num, low", [(8, 4, 2, 1), (24, 2, 6, 1), (24, 2, 6, 4), (12, 1, 4, 2)])
def test_elastic_size_is_the_largest_count_that_fits_and_keeps_the_batch(global_batch, micro, num, low):
    cfg = tiny(f"batch.global_batch_size={global_batch}", f"batch.micro_batch_size={micro}", f"workers.num_workers={num}",
               f"workers.min_workers={low}", f"run.eval_samples={global_batch}", "engine.zero_stage=0")
    for fit in range(0, num + 3):
        expected = [n for n in range(low, min(fit, num) + 1) if keeps_the_global_batch(cfg, n)]
        if not expected:
            with pytest.raises(TooFewWorkers, match=rf"holds {fit} of workers\.num_workers={num} .*min_workers={low}"):
                elastic_size(cfg, fit)
            continue
        sized = elastic_size(cfg, fit)
        assert sized.workers.num_workers == max(expected), (fit, expected)
        assert sized.grad_accum * sized.batch.micro_batch_size * sized.workers.num_workers == global_batch
        assert (sized.model, sized.optimizer, sized.batch) == (cfg.model, cfg.optimizer, cfg.batch)
    assert cfg.workers.num_workers == num  # the run's own config is untouched


def test_elastic_size_names_the_counts_that_do_not_keep_the_batch():
    cfg = tiny("batch.global_batch_size=16", "batch.micro_batch_size=4", "workers.num_workers=4", "workers.min_workers=3",
               "engine.zero_stage=0")
    with pytest.raises(TooFewWorkers, match=r"holds 3 of workers\.num_workers=4 .*min_workers=3; .*3 workers: "
                                            r"batch\.global_batch_size \(16\) must be a multiple of .* \(12\)"):
        elastic_size(cfg, 3)


def test_min_workers_defaults_to_num_workers_and_is_checked():
    assert WorkersConfig(num_workers=3).min_workers == 3  # not elastic
    assert WorkersConfig(num_workers=3, min_workers=1).min_workers == 1
    for bad in (0, 4):
        with pytest.raises(ValueError, match=rf"min_workers must be from 1 to num_workers \(3\), got {bad}"):
            WorkersConfig(num_workers=3, min_workers=bad)


def test_an_elastic_run_needs_only_min_workers_to_fit():
    nodes = {"10.0.0.1 (a)": {"CPU": 2.0}}
    check_fits(nodes, WorkersConfig(num_workers=4, min_workers=2))  # starts with 2
    with pytest.raises(ClusterTooSmall, match=r"workers\.min_workers=3 workers of 1 CPU each \(workers\.placement=PACK\) "
                                              r"need 3 CPUs and 0 GPUs; .* hold 2 of them"):
        check_fits(nodes, WorkersConfig(num_workers=4, min_workers=3))


def check_in_group(rank: int, store: str, run_dirs: list[str], results: str) -> None:
    """Rank `rank` of a gloo group of len(run_dirs) processes runs the check on its own RUN_DIR."""
    dist.init_process_group("gloo", store=dist.FileStore(store, len(run_dirs)), rank=rank, world_size=len(run_dirs))
    try:
        check_shared_run_dir(run_dirs[rank], f"node-{rank}")
        outcome = "ok"
    except SharedStorageError as e:
        outcome = str(e)
    with open(os.path.join(results, f"rank{rank}"), "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


def run_check(tmp_path, run_dirs: list) -> list[str]:
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(check_in_group, args=(str(tmp_path / "store"), [str(d) for d in run_dirs], str(results)), nprocs=len(run_dirs))
    return [(results / f"rank{r}").read_text() for r in range(len(run_dirs))]


def test_ranks_sharing_run_dir_pass_and_leave_no_markers(tmp_path):
    shared = tmp_path / "run"
    assert run_check(tmp_path, [shared, shared, shared]) == ["ok"] * 3
    assert list((shared / MARKERS).iterdir()) == []


def test_ranks_seeing_different_run_dirs_all_stop_naming_the_others(tmp_path):
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    outcomes = run_check(tmp_path, [a, b, a])
    assert len(set(outcomes)) == 1, outcomes  # every rank stops, with the same error
    assert f"rank 0 (node node-0, {a}) does not see the markers of rank 1 on node node-1 writes to {b}." in outcomes[0]
    assert "rank 2" not in outcomes[0]


def test_only_communication_errors_wait_for_a_dead_peer():
    """A peer lost with its node shows first as a collective's error; any other exception stops the run at once."""
    from torch.distributed import DistNetworkError

    gloo = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:31126"
    assert lost_a_peer(RuntimeError(gloo)) and lost_a_peer(DistNetworkError("store connection reset"))
    assert not lost_a_peer(IsADirectoryError("step_00000008/config.yaml")) and not lost_a_peer(ValueError("bad shape"))
