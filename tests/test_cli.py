"""The `curvtrain` command line as a user runs it: a subprocess, a fresh local Ray runtime, exit codes."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import CONFIG, tiny
from curvtrain.distributed.export import consolidated_state_dict, export_checkpoint
from curvtrain.models.llama import LlamaForCausalLM, llama_config

ROOT = Path(__file__).parents[1]


def curvtrain(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curvtrain.launcher", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args, message", [
    (["--set", "engine.zero_stage=5"], "engine: zero_stage must be 0, 1, 2 or 3"),
    (["--set", "optimizer.betas=0.9"], "optimizer.betas: expected a list of 2 values"),
    (["--set", "schedule.max_step=10"], "unknown config key schedule.max_step"),
    (["--set", "data.corpus=/no/such/corpus"], "/no/such/corpus"),
    (["--resume"], "no checkpoint"),
    (["--set", "optimizer.lr=[1"], "--set optimizer.lr=[1: the value is not valid YAML"),
    (["--set", "optimizer.lr=!!python/object/apply:os.system [touch /tmp/curvtrain-set-ran]"],
     "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    (["--set", "optimizer.name=gradnorm_lorp", "--set", "engine.zero_stage=0", "--set", "optimizer.lowrank.rank=64"],
     "rank 64 must be < min(m, n) = 64"),
    (["--set", "optimizer.name=gradnorm_lorp", "--set", "engine.zero_stage=0", "--set", "optimizer.lowrank.targets=nothing$"],
     "nothing$"),
    (["--set", "model.vocab_size=1000"],
     "model.vocab_size=1000 is smaller than the vocabulary of data.tokenizer='mistral-v1' (32000 tokens)"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, args, message):
    out = tmp_path / "run"
    result = curvtrain("pretrain", "--config", str(CONFIG), "--out", str(out), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_a_tokenizer_without_eos_is_refused_before_ray_starts(tmp_path):
    from test_data import word_tokenizer

    no_eos = word_tokenizer(tmp_path / "words", 100, eos=None)
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = curvtrain("pretrain", "--config", str(CONFIG), "--out", str(out), "--set", f"data.tokenizer={no_eos}",
                       "--set", f"data.cache_dir={cache}")
    assert result.returncode == 2, result.stderr
    assert f"data.tokenizer='{no_eos}' has no end-of-sequence token (eos_id=None" in result.stderr
    assert "Traceback" not in result.stderr and "Started a local Ray instance" not in result.stdout + result.stderr
    assert not out.exists() and not cache.exists()


def test_failure_during_the_run_exits_1_and_the_run_resumes(tmp_path):
    """A real failure inside a worker mid-run: where the step 8 checkpoint's config.yaml goes there is a
    folder, so rank 0's save raises IsADirectoryError (an OSError, which used to exit 2 like bad input).
    Exit 1 with the worker's traceback; the last sealed checkpoint stays intact, and --resume (which
    drops the unsealed step 8 folder) finishes the run."""
    from curvtrain.distributed import checkpoint
    from curvtrain.distributed.metrics import read_metrics

    run_dir = tmp_path / "run"
    first, blocked = run_dir / "checkpoints" / "step_00000004", run_dir / "checkpoints" / "step_00000008"

    def block_the_next_checkpoint() -> None:
        deadline = time.time() + 600
        while not (first / checkpoint.MANIFEST).exists() and time.time() < deadline:
            time.sleep(0.01)
        (blocked / "config.yaml").mkdir(parents=True)

    blocker = threading.Thread(target=block_the_next_checkpoint)
    blocker.start()
    args = ("pretrain", "--config", str(CONFIG), "--out", str(run_dir), "--set", "schedule.max_steps=10",
            "--set", "run.checkpoint_interval=4")
    failed = curvtrain(*args)
    blocker.join()
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "the run failed" in failed.stderr and "traceback" in failed.stderr
    assert "in write" in failed.stderr and "checkpointer.py" in failed.stderr  # the worker's frames (Checkpointer.write)
    assert "IsADirectoryError" in failed.stderr and "step_00000008/config.yaml" in failed.stderr
    assert "keeps its last sealed checkpoint step_00000004" in failed.stderr and "--resume" in failed.stderr
    assert checkpoint.latest(run_dir / "checkpoints") == first
    checkpoint.validate(first)

    resumed = curvtrain(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 11))


def test_corrupt_checkpoint_is_refused_and_left_untouched(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs("engine.zero_stage=1"), run_dir)
    shard = run_dir / "checkpoints" / "step_00000020" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = snapshot(run_dir)
    result = curvtrain("pretrain", "--config", str(CONFIG), "--out", str(run_dir), "--resume")
    assert result.returncode == 2
    assert "is corrupt" in result.stderr and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in result.stderr
    assert snapshot(run_dir) == before


def test_existing_run_is_not_overwritten_without_resume(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs("engine.zero_stage=1"), run_dir)
    before = snapshot(run_dir)
    result = curvtrain("pretrain", "--config", str(CONFIG), "--out", str(run_dir))
    assert result.returncode == 2 and "pass --resume" in result.stderr
    assert snapshot(run_dir) == before


class MakesMarker:
    """A pickled object whose loading runs code: unpickling it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_checkpoint_holding_a_malicious_pickle_is_refused_and_never_run(runs, tmp_path):
    """A run directory from someone else: a DeepSpeed file (which DeepSpeed itself loads with full
    unpickling) carries an object that runs code when unpickled, and the manifest is re-sealed so its
    checksums match. Neither --resume nor export may unpickle it: exit 2, the file named."""
    from curvtrain.distributed import checkpoint

    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(runs("engine.zero_stage=1"), run_dir)
    ckpt = checkpoint.latest(run_dir / "checkpoints")
    states = ckpt / "mp_rank_00_model_states.pt"
    with checkpoint.weights_only_loading():
        state = torch.load(states, weights_only=True)
    torch.save({**state, "note": MakesMarker(marker)}, states)
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    (ckpt / checkpoint.MANIFEST).unlink()
    checkpoint.write_manifest(ckpt, [], step=manifest["step"], world_size=manifest["world_size"], zero_stage=manifest["zero_stage"])
    before = snapshot(run_dir)

    resumed = curvtrain("pretrain", "--config", str(CONFIG), "--out", str(run_dir), "--resume", "--set", "schedule.max_steps=22")
    exported = curvtrain("export", str(run_dir), str(tmp_path / "hf"))
    for result in (resumed, exported):
        assert result.returncode == 2, result.stderr[-3000:]
        assert "mp_rank_00_model_states.pt holds Python objects" in result.stderr and "refused" in result.stderr
        assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert snapshot(run_dir) == before


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def our_logits(state_dict: dict, name: str, ids: torch.Tensor) -> torch.Tensor:
    model = LlamaForCausalLM(llama_config(name))
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model(ids)


def test_pretrain_then_export_from_the_command_line(tmp_path):
    pytest.importorskip("transformers")
    run_dir, hf_dir = tmp_path / "run", tmp_path / "hf"
    result = curvtrain("pretrain", "--config", str(CONFIG), "--out", str(run_dir), "--set", "schedule.max_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"metrics:     {run_dir / 'metrics.jsonl'}" in result.stdout and "loss.png" in result.stdout
    # output to a pipe, not a terminal: one plain line per progress update (4 steps: every step), each once
    output = result.stdout + result.stderr
    progress = [m.group() for line in output.splitlines() if (m := re.search(r"train: step [^,]*", line))]
    assert progress == [f"train: step {i}/4 ({25 * i}%)" for i in range(1, 5)], output[-3000:]
    assert "\r" not in output and "__ray_tqdm_magic_token__" not in output
    assert (run_dir / "loss.png").is_file() and (run_dir / "config.yaml").is_file()

    result = curvtrain("export", str(run_dir), str(hf_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    ids = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(0))
    state = consolidated_state_dict(run_dir / "checkpoints" / "step_00000004")
    assert (hf_logits(hf_dir, ids) - our_logits(state, "tiny", ids)).abs().max() <= 1e-4

    again = curvtrain("export", str(run_dir), str(hf_dir))
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.parametrize("stage", [0, 3])
def test_export_round_trip_from_every_layout(runs, tmp_path, stage):
    """ZeRO-3 shards parameters, stage 0 keeps them whole: both consolidate to the trained weights."""
    ckpt = runs(f"engine.zero_stage={stage}") / "checkpoints" / "step_00000020"
    state = consolidated_state_dict(ckpt)
    export_checkpoint(ckpt, tiny(f"engine.zero_stage={stage}"), tmp_path / "hf")
    ids = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = our_logits(state, "tiny", ids)
    assert (hf_logits(tmp_path / "hf", ids) - ours).abs().max() <= 1e-4
    untrained = our_logits(LlamaForCausalLM(llama_config("tiny")).state_dict(), "tiny", ids)
    assert (ours - untrained).abs().max() > 1e-2  # the weights are the trained ones


def test_pretrain_and_export_take_the_vocabulary_of_a_hugging_face_tokenizer(tmp_path):
    """A tokenizer.json trained in the test (300 tokens): the model pretrains with 300 embedding rows, and the
    export loads in transformers with that tokenizer and generates."""
    transformers = pytest.importorskip("transformers")
    from test_data import train_bpe

    tokenizer = train_bpe(tmp_path / "bpe", vocab_size=300)
    run_dir, hf_dir = tmp_path / "run", tmp_path / "hf"
    result = curvtrain("pretrain", "--config", str(CONFIG), "--out", str(run_dir), "--set", "schedule.max_steps=2",
                       "--set", f"data.tokenizer={tokenizer}", "--set", f"data.cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stderr[-3000:]
    state = consolidated_state_dict(run_dir / "checkpoints" / "step_00000002")
    assert state["model.embed_tokens.weight"].shape[0] == state["lm_head.weight"].shape[0] == 300
    assert curvtrain("export", str(run_dir), str(hf_dir)).returncode == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.config.vocab_size == 300 and hf_tok.eos_token == "<|endoftext|>"
    ids = hf_tok("The quick brown fox", return_tensors="pt")["input_ids"]
    assert ids.max() < 300
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=hf_tok.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(hf_tok.decode(out[0]), str)


def test_plain_progress_prints_one_line_per_tenth(capsys):
    """Where output is not a terminal, progress is ten plain lines a run (and the postfix set before each)."""
    from curvtrain.distributed.progress import PlainProgress

    bar = PlainProgress(initial=0, total=95, desc="federate fedavg", unit="round")
    for i in range(95):
        bar.set_postfix({"test_loss": f"{i:.1f}"})
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"federate fedavg: round {n}/95 ({100 * n / 95:.0f}%)"
                                                       for n in (*range(10, 95, 10), 95)]
    assert lines[-1].endswith("round/s, test_loss=94.0")
    resumed = PlainProgress(initial=40, total=50, desc="train", unit="step")
    resumed.update(5)
    resumed.close()
    assert capsys.readouterr().out.splitlines()[0].startswith("train: step 45/50 (90%)")
