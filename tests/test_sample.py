"""`curvtrain sample` on a tiny run: greedy continuation equal to transformers' greedy `generate` on the
exported model; the checkpoint and the export give the same text; top-k sampling is seeded."""
import pytest
import torch

from conftest import tiny
from curvtrain.distributed import sampling
from curvtrain.distributed.export import export_checkpoint
from curvtrain.models.llama import generate
from test_cli import curvtrain

PROMPT = "The history of"


@pytest.fixture(scope="module")
def trained(runs, tmp_path_factory):
    """A finished tiny run (20 steps, ZeRO 1) and its export."""
    run_dir = runs()
    ckpt = run_dir / "checkpoints" / "step_00000020"
    exported = export_checkpoint(ckpt, tiny(), tmp_path_factory.mktemp("sample") / "hf")
    return run_dir, exported


@pytest.mark.slow
def test_greedy_equals_transformers_generate(trained):
    transformers = pytest.importorskip("transformers")
    run_dir, exported = trained
    model, tokenizer = sampling.load_checkpoint(run_dir / "checkpoints" / "step_00000020", tiny())
    ids = [tokenizer.eos_id] + tokenizer.encode(PROMPT)
    ours = generate(model, ids, 12, stop_id=tokenizer.eos_id)
    hf = transformers.LlamaForCausalLM.from_pretrained(exported).eval()
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_id,
                         pad_token_id=tokenizer.eos_id)[0, len(ids):].tolist()
    assert ours == theirs and len(ours) > 0


@pytest.mark.slow
def test_sample_from_the_command_line_reads_the_run_and_the_export_alike(trained):
    run_dir, exported = trained
    from_run = curvtrain("sample", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "16")
    from_export = curvtrain("sample", str(exported), "--prompt", PROMPT, "--max-new-tokens", "16")
    assert from_run.returncode == 0, from_run.stderr[-3000:]
    assert from_export.returncode == 0, from_export.stderr[-3000:]
    assert from_run.stdout.startswith(PROMPT) and len(from_run.stdout.strip()) > len(PROMPT)
    assert from_run.stdout == from_export.stdout


@pytest.mark.slow
def test_top_k_sampling_is_seeded_and_top_1_is_greedy(trained):
    model, tokenizer = sampling.load_exported(trained[1])
    kw = dict(max_new_tokens=16, temperature=1.0)
    greedy = sampling.sample(model, tokenizer, PROMPT, **kw)
    assert sampling.sample(model, tokenizer, PROMPT, top_k=1, **kw) == greedy
    first, again = (sampling.sample(model, tokenizer, PROMPT, top_k=50, seed=3, **kw) for _ in range(2))
    assert first == again
    assert {sampling.sample(model, tokenizer, PROMPT, top_k=50, seed=s, **kw) for s in range(4)} != {greedy}


def test_sample_of_a_missing_run_exits_2(tmp_path):
    result = curvtrain("sample", str(tmp_path / "nothing"), "--prompt", "x")
    assert result.returncode == 2 and "nothing" in result.stderr and "Traceback" not in result.stderr
