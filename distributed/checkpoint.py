"""Checkpoints of a run: DeepSpeed engine shards + per-rank trainer state + a manifest written last.

Layout under RUN_DIR/checkpoints/:

    step_00000100/               one checkpoint ("tag")
        <DeepSpeed files>        model, optimizer (ZeRO shards), lr scheduler
        trainer_rank{r}.pt       step, tokens seen, RNG states of rank r
        optimizer_rank{r}.safetensors  the optimizer state of the parameters rank r owns, by name (owner
                                 distributor only: loads under any plan, `distributor.param_state`)
        config.yaml              the run's resolved config (so `export` needs only this folder)
        manifest.json            every file's size and sha256, world size, ZeRO stage, distributor; written
                                 after all ranks saved
    LATEST                       the newest complete tag; replaced atomically after its manifest
    universal/step_…             a ZeRO 1-3 checkpoint converted for a resume at another worker count
                                 (`distributor.zero.to_universal`)

Sealing: each rank hashes the files it wrote (`writer_rank`) right after writing them, all ranks in
parallel (`hash_own_files`); rank 0 gathers the hashes and only merges them into the manifest
(`write_manifest`).

A checkpoint without a manifest, whose files disagree with it, or holding a file it does not list, is
never loaded: `validate` names the problem and the coordinator checks it before any worker starts.

Nothing in a checkpoint is unpickled: a run directory copied from someone else must not run code on
`--resume` or `export`. `validate` refuses a file holding any Python object other than tensors, plain
data and the few record types DeepSpeed writes (SAFE_TYPES), and every load runs under
`weights_only_loading()`, which makes torch.load weights-only even where DeepSpeed asks for full
unpickling.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from curvtrain.models.files import write_text_atomic

MANIFEST = "manifest.json"
LATEST = "LATEST"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (it would overwrite or lose saved work)."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt."""


# The only non-tensor, non-builtin types DeepSpeed 0.19 writes into its checkpoint files (ZeRO 0-3, fp32
# and bf16; found with torch.serialization.get_unsafe_globals_in_checkpoint): plain records whose
# construction from a file runs no code of the file's choosing.
SAFE_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _safe_types() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loading():
    """Every torch.load inside the block is weights-only (tensors, plain data, SAFE_TYPES), ours and
    DeepSpeed's alike: its engine and zero_to_fp32 ask torch.load for full unpickling, which the environment
    variable TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides."""
    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_safe_types()):
            yield
    finally:
        if saved is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


def _check_weights_only(ckpt_dir: Path, name: str) -> None:
    """Refuse a .pt file whose pickle names any global outside torch's weights-only set and SAFE_TYPES
    (read from its opcodes, nothing executed)."""
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(ckpt_dir / name)) - set(SAFE_TYPES)
    except Exception as e:  # not a torch zip file at all
        raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {name} is not a torch checkpoint file ({e})") from None
    if unsafe:
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: {name} holds Python objects ({', '.join(sorted(unsafe))}) that only full "
            f"unpickling could load, which can run arbitrary code: refused (only tensors and plain data are loaded)"
        )


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(ckpt_dir: Path) -> int:
    return int(Path(ckpt_dir).name.removeprefix("step_"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def writer_rank(name: str) -> int:
    """The rank that writes checkpoint file `name`: the first rank number in its name (DeepSpeed's
    zero_pp_rank_{r}_…, our trainer_rank{r}.pt; DeepSpeed's mp_rank_00_model_states.pt, written by
    rank 0 at ZeRO 0-2), else 0 (config.yaml)."""
    found = re.search(r"rank_?(\d+)", name)
    return int(found.group(1)) if found else 0


def _entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _files(ckpt_dir: Path) -> list[Path]:
    return [p for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != MANIFEST]


def hash_own_files(ckpt_dir: Path, rank: int) -> dict[str, dict]:
    """Size and sha256 of the files of ckpt_dir that `rank` wrote (call it right after writing them:
    they are complete, and still in the page cache)."""
    return {
        str(p.relative_to(ckpt_dir)): _entry(p)
        for p in _files(ckpt_dir)
        if writer_rank(str(p.relative_to(ckpt_dir))) == rank
    }


def write_manifest(ckpt_dir: Path, hashes: list[dict[str, dict]], *, step: int, world_size: int, zero_stage: int,
                   **fields) -> None:
    """Seal a checkpoint all ranks have finished writing, then point LATEST at it (rank 0 only).
    `hashes`: each rank's `hash_own_files`; a file in none of them is hashed here. `fields`: more plain
    facts of the writer that a resume checks (pretraining: `distributor`)."""
    merged = {name: meta for own in hashes for name, meta in own.items()}
    files = {}
    for p in _files(ckpt_dir):
        name = str(p.relative_to(ckpt_dir))
        files[name] = merged[name] if name in merged else _entry(p)
    manifest = {"step": step, "world_size": world_size, "zero_stage": zero_stage, **fields, "files": files}
    write_text_atomic(ckpt_dir / MANIFEST, json.dumps(manifest, indent=1))
    write_text_atomic(ckpt_dir.parent / LATEST, ckpt_dir.name)


def read_manifest(ckpt_dir: Path) -> dict:
    """The manifest of a checkpoint that `validate` has passed."""
    return json.loads((Path(ckpt_dir) / MANIFEST).read_text())


def validate(ckpt_dir: Path) -> dict:
    """Return the manifest of a complete, intact checkpoint whose files load weights-only; raise
    CheckpointError naming what is wrong."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir} does not exist")
    try:
        manifest = json.loads((ckpt_dir / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: no {MANIFEST} (the save did not finish)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: unreadable {MANIFEST} ({e})") from None
    for name, meta in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: missing file {name}")
        if path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {name} does not match its manifest checksum")
        if name.endswith(".pt"):
            _check_weights_only(ckpt_dir, name)
    unlisted = [name for name in (str(p.relative_to(ckpt_dir)) for p in _files(ckpt_dir)) if name not in files]
    if unlisted:  # loaders read files by name pattern: one the seal does not vouch for is never loaded
        raise CheckpointError(f"checkpoint {ckpt_dir} holds {unlisted[0]}, a file its {MANIFEST} does not list "
                              f"(added after it was sealed): refused")
    return manifest


FIXED_ON_RESUME = ("model", "optimizer", "engine.precision")
"""Config fields a resumed run keeps from its checkpoint (its weights' shape and dtype, its optimizer state and
LR schedule, which holds the peak rate: a new optimizer.lr would be silently ignored). `engine.zero_stage` and
`workers.num_workers` are checked with the checkpoint's layout; every other field may change on resume."""


def check_settings(ckpt_dir: Path, config: dict) -> None:
    """CheckpointError naming the first FIXED_ON_RESUME field where `config` (a resolved run config as plain
    data, `config_to_dict`) differs from the config.yaml saved in the checkpoint, with both values."""
    import yaml

    try:
        saved = yaml.safe_load((Path(ckpt_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no readable config.yaml ({e})") from None

    def differences(old, new, path: str):
        if isinstance(old, dict) and isinstance(new, dict):
            for key in new:
                if key in old:  # a field added since the checkpoint was written is not compared
                    yield from differences(old[key], new[key], f"{path}.{key}")
        elif old != new:
            yield path, old, new

    for fixed in FIXED_ON_RESUME:
        old, new = saved, config
        for part in fixed.split("."):
            old, new = (old or {}).get(part), new[part]
        for field, was, now in differences(old, new, fixed):
            raise CheckpointError(
                f"--resume: checkpoint {Path(ckpt_dir).name} was trained with {field}={was!r}, this run has {field}={now!r}; "
                f"a resumed run keeps the checkpoint's {', '.join(f + ('.*' if '.' not in f else '') for f in FIXED_ON_RESUME)} "
                f"(drop the override, or start a new run in another --out)")


def latest(ckpt_root: Path) -> Path | None:
    """The newest sealed checkpoint folder under ckpt_root, or None if there is none."""
    pointer = Path(ckpt_root) / LATEST
    if not pointer.is_file():
        return None
    return Path(ckpt_root) / pointer.read_text().strip()


def resolve(path: Path) -> Path:
    """A run directory, a checkpoints folder or one checkpoint → the checkpoint folder to load."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        found = latest(root)
        if found is not None:
            return found
    if (path / MANIFEST).is_file() or any(path.glob("trainer_rank*.pt")):
        return path
    raise CheckpointError(f"no checkpoint found at {path} (expected a run directory, its checkpoints/ or a step_* folder)")


def prune(ckpt_root: Path, keep: int) -> None:
    """Delete all but the newest `keep` sealed checkpoints (never the one LATEST names)."""
    sealed = sorted(p for p in Path(ckpt_root).glob("step_*") if (p / MANIFEST).is_file())
    newest = latest(ckpt_root)
    for old in sealed[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def to_resume(run_dir: Path, resume: bool) -> Path | None:
    """The newest sealed checkpoint of `run_dir` when resuming (RunDirError if there is none), else None
    after making sure a fresh run overwrites no checkpoint (RunDirError). Its contents are not checked here."""
    ckpt_root = Path(run_dir) / "checkpoints"
    if resume:
        found = latest(ckpt_root)
        if found is None:
            raise RunDirError(f"--resume: no checkpoint in {ckpt_root}")
        return found
    if ckpt_root.exists() and any(ckpt_root.iterdir()):
        raise RunDirError(f"run directory {run_dir} already holds checkpoints: pass --resume to continue it, or choose another --out")
    return None


def remove_unsealed(ckpt_root: Path) -> None:
    """A save interrupted by a crash leaves a step_* folder without manifest: it holds nothing usable."""
    for folder in Path(ckpt_root).glob("step_*"):
        if not (folder / MANIFEST).is_file():
            shutil.rmtree(folder, ignore_errors=True)
