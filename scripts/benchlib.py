"""What the benchmark scripts share: one measurement per fresh process (a clean peak memory), its
result handed back as one `RESULT {json}` line."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_isolated(script: str, spec: dict) -> tuple[dict | None, str]:
    """Run `python script --one SPEC` in a new process; (its result, or None if it failed; its stderr)."""
    proc = subprocess.run([sys.executable, script, "--one", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return None, proc.stderr
    return json.loads(lines[0].removeprefix("RESULT ")), proc.stderr


def report(result: dict) -> None:
    """The child's side: print the result line `run_isolated` reads."""
    print("RESULT " + json.dumps(result), flush=True)


def add_common_args(p: argparse.ArgumentParser, threads_help: str) -> None:
    """Options every benchmark takes, and the hidden `--one SPEC` of its child processes."""
    p.add_argument("--precision", default=None, help="bf16 (cuda default) or fp32 (cpu default)")
    p.add_argument("--threads", type=int, default=1, help=threads_help)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", help=argparse.SUPPRESS)


def run_child(args: argparse.Namespace, run_one) -> bool:
    """In a child process (`--one SPEC`): run the one measurement, report it and say True."""
    if args.one:
        report(run_one(json.loads(args.one)))
    return bool(args.one)


def timed_ms(step, n: int, device) -> float:
    """Mean wall-clock milliseconds of `n` calls of `step()` on `device`, GPU work included."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return 1000 * (time.perf_counter() - t) / n


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
