"""What the benchmark scripts share: one measurement per fresh process (a clean peak memory), its
result handed back as one `RESULT {json}` line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
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


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
