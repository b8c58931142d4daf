"""Tokenizing speed (MB/s of text) on 1 and 2 cores, and the peak memory of tokenizing one large file.

    python scripts/bench_tokenize.py --mb 100 --cores 1 2 --repeats 2            # speed: a 100 MB .jsonl corpus
    python scripts/bench_tokenize.py --mb 1024 --single-file --cores 2 --repeats 1   # memory: one 1 GiB .txt

The corpus is the shipped Wikipedia sample (`wiki-sample`, extracted to prose) repeated until it holds --mb
MiB of UTF-8 text: one JSON line per article (many documents), or, with --single-file, one .txt file that is a
single document (cut into pieces at line boundaries by the reader). Each measurement is `prepare_tokens` into
an empty cache, in its own process pinned to the first N cores (sched_setaffinity, before any tokenizer
starts its threads), with two tokenizers: the default SentencePiece model (mistral-v1, 32,000 tokens) and the
same model as a Hugging Face tokenizer.json (models.hf's conversion; `tokenizers` encodes it in Rust).
MB/s = text bytes / wall seconds of prepare_tokens (reading, encoding and writing the token file); peak =
the process's resident high-water mark, imports (torch) included.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.benchlib import Spread, ratio, run_child, run_interleaved  # noqa: E402


def make_corpus(folder: Path, mb: int, single_file: bool) -> Path:
    """The wiki-sample documents repeated to `mb` MiB: docs.jsonl, or big.txt (one document)."""
    from curvtrain.models.data.corpus import iter_documents

    docs = list(iter_documents("wiki-sample"))
    path = folder / ("big.txt" if single_file else "docs.jsonl")
    target, written = mb << 20, 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            for doc in docs:
                text = doc + "\n\n" if single_file else json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                f.write(text)
                written += len(text.encode())
                if written >= target:
                    break
    return path


def hf_tokenizer_json(folder: Path) -> Path:
    """mistral-v1 as a tokenizer.json (the conversion `export` writes)."""
    from curvtrain.models.data.tokenizer import Tokenizer
    from curvtrain.models.hf import _tokenizer_json

    sp = Tokenizer.load("mistral-v1")
    path = folder / "tokenizer.json"
    path.write_text(json.dumps(_tokenizer_json(sp.processor, sp.bos_id), ensure_ascii=False))
    return path


def measure(spec: dict) -> dict:
    os.sched_setaffinity(0, set(range(spec["cores"])))
    from curvtrain.models.data import DataConfig, prepare_tokens

    cache = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        start = time.perf_counter()
        out = prepare_tokens(DataConfig(corpus=spec["corpus"], tokenizer=spec["tokenizer"], cache_dir=str(cache)))
        seconds = time.perf_counter() - start
        meta = json.loads((out / "meta.json").read_text())
    finally:
        shutil.rmtree(cache)
    text_bytes = Path(spec["corpus"]).stat().st_size
    return {"seconds": seconds, "mb_per_s": text_bytes / 2**20 / seconds, "tokens": meta["num_tokens"],
            "docs": meta["num_docs"], "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=100, help="MiB of text in the generated corpus")
    p.add_argument("--single-file", action="store_true", help="one .txt file holding one document")
    p.add_argument("--cores", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizers", nargs="+", default=["sentencepiece", "huggingface"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where the corpus is generated (default: a temporary folder)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if run_child(args, measure):
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-tokenize-corpus-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(work, args.mb, args.single_file)
    paths = {"sentencepiece": "mistral-v1", "huggingface": str(hf_tokenizer_json(work))}
    specs = [{"corpus": str(corpus), "tokenizer": paths[t], "kind": t, "cores": c}
             for t in args.tokenizers for c in args.cores]
    print(f"corpus {corpus}: {corpus.stat().st_size / 2**20:.0f} MiB; cores available: {len(os.sched_getaffinity(0))}")
    results = run_interleaved(__file__, specs, args.repeats, label=lambda s: f"{s['kind']} on {s['cores']} core(s)")
    print("| tokenizer | cores | MB/s of text | seconds | peak RSS GiB | tokens | documents |\n|---|---|---|---|---|---|---|")
    speeds = {}
    for spec, runs in zip(specs, results):
        speed = Spread(tuple(r["mb_per_s"] for r in runs))
        speeds[spec["kind"], spec["cores"]] = speed
        print(f"| {spec['kind']} | {spec['cores']} | {speed} | {Spread(tuple(r['seconds'] for r in runs))} | "
              f"{max(r['peak_rss_gib'] for r in runs):.2f} | {runs[0]['tokens']:,} | {runs[0]['docs']:,} |")
    for kind in args.tokenizers:
        if (kind, 1) in speeds and (kind, 2) in speeds:
            print(f"{kind}: 2 cores / 1 core = {ratio(speeds[kind, 2], speeds[kind, 1])}")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
