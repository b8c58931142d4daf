"""Sealing a checkpoint without processes: each rank hashes the files it wrote, rank 0 only merges."""
import re

import pytest
import torch

from curvtrain.distributed import checkpoint

# The files of a 2-worker ZeRO-1 checkpoint (DeepSpeed's names and ours) and the rank that writes each.
WRITERS = {
    "mp_rank_00_model_states.pt": 0,
    "zero_pp_rank_0_mp_rank_00_optim_states.pt": 0,
    "zero_pp_rank_1_mp_rank_00_optim_states.pt": 1,
    "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": 1,
    "zero_pp_rank_1_mp_rank_00_model_states.pt": 1,
    "trainer_rank0.pt": 0,
    "trainer_rank1.pt": 1,
    "optimizer_rank1.safetensors": 1,
    "config.yaml": 0,
}


@pytest.fixture
def ckpt(tmp_path):
    folder = tmp_path / "checkpoints" / checkpoint.tag_for(7)
    folder.mkdir(parents=True)
    for i, name in enumerate(WRITERS):
        if name.endswith(".pt"):
            torch.save({"weights": torch.full((100 + i,), float(i))}, folder / name)
        else:
            (folder / name).write_text(f"rank: {i}\n")
    return folder


def test_writer_rank_of_every_file():
    assert {name: checkpoint.writer_rank(name) for name in WRITERS} == WRITERS


def test_ranks_hash_their_own_files_and_rank_0_only_merges(ckpt, monkeypatch):
    own = [checkpoint.hash_own_files(ckpt, rank) for rank in (0, 1)]
    assert sorted(own[0]) == sorted(n for n, r in WRITERS.items() if r == 0)
    assert sorted(own[1]) == sorted(n for n, r in WRITERS.items() if r == 1)

    hashed = []
    monkeypatch.setattr(checkpoint, "_sha256", lambda path: hashed.append(path) or "")
    checkpoint.write_manifest(ckpt, own, step=7, world_size=2, zero_stage=1)
    assert hashed == []  # rank 0 hashed nothing itself
    monkeypatch.undo()
    manifest = checkpoint.validate(ckpt)  # the merged hashes are the files' true ones
    assert sorted(manifest["files"]) == sorted(WRITERS) and manifest["world_size"] == 2
    assert checkpoint.latest(ckpt.parent) == ckpt


def test_merged_hashes_are_what_validate_checks(ckpt):
    """A wrong hash reported by a rank is sealed as is and the checkpoint then fails validation, naming
    the file: the manifest holds the ranks' hashes, and validate() checks every file against it."""
    own = [checkpoint.hash_own_files(ckpt, rank) for rank in (0, 1)]
    own[1]["trainer_rank1.pt"]["sha256"] = "0" * 64
    checkpoint.write_manifest(ckpt, own, step=7, world_size=2, zero_stage=1)
    with pytest.raises(checkpoint.CheckpointError, match="trainer_rank1.pt does not match its manifest checksum"):
        checkpoint.validate(ckpt)


def test_a_file_no_rank_reported_is_hashed_by_rank_0(ckpt):
    checkpoint.write_manifest(ckpt, [checkpoint.hash_own_files(ckpt, 0)], step=7, world_size=2, zero_stage=1)
    assert sorted(checkpoint.validate(ckpt)["files"]) == sorted(WRITERS)


def test_a_file_the_manifest_does_not_list_is_refused(ckpt):
    """A file put into a sealed checkpoint (a second optimizer shard, a stray pickle) would be loaded by
    name pattern although the seal does not vouch for it: validate refuses it, naming it."""
    checkpoint.write_manifest(ckpt, [checkpoint.hash_own_files(ckpt, r) for r in (0, 1)], step=7, world_size=2, zero_stage=1)
    torch.save({"weights": torch.zeros(3)}, ckpt / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    with pytest.raises(checkpoint.CheckpointError, match="holds zero_pp_rank_2_mp_rank_00_optim_states.pt, a file its manifest.json does not list"):
        checkpoint.validate(ckpt)


def test_resume_settings_must_match_the_checkpoints(ckpt):
    """model.*, optimizer.* and engine.precision are the checkpoint's; other fields may change."""
    from conftest import tiny
    from curvtrain.distributed.config import config_to_dict, save_config

    save_config(tiny(), ckpt / "config.yaml")
    checkpoint.check_settings(ckpt, config_to_dict(tiny("schedule.max_steps=40", "run.log_interval=5")))
    for override, message in [
        ("optimizer.lr=1e-3", "trained with optimizer.lr=0.003, this run has optimizer.lr=0.001"),
        ("optimizer.name=sgd", "trained with optimizer.name='adamw', this run has optimizer.name='sgd'"),
        ("optimizer.betas=[0.9, 0.99]", "optimizer.betas=[0.9, 0.95], this run has optimizer.betas=[0.9, 0.99]"),
        ("engine.precision=bf16", "engine.precision='fp32', this run has engine.precision='bf16'"),
        ("model.name=20m", "model.name='tiny', this run has model.name='20m'"),
    ]:
        with pytest.raises(checkpoint.CheckpointError, match=re.escape(message)):
            checkpoint.check_settings(ckpt, config_to_dict(tiny(override)))
