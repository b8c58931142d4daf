"""What the benchmark scripts share: one measurement per fresh process (a clean peak memory), its
result handed back as one `RESULT {json}` line; configurations repeated and interleaved (A B A B ...,
so that a slow spell of a shared machine hits all of them alike), summarized by median and spread, and a
ratio claimed only where the spreads do not overlap."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_isolated(script: str, spec: dict) -> tuple[dict | None, str]:
    """Run `python script --one SPEC` in a new process; (its result, or None if it failed; its stderr)."""
    proc = subprocess.run([sys.executable, script, "--one", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        killed = f"\n(killed by signal {-proc.returncode}: out of host memory?)" if proc.returncode < 0 else ""
        return None, proc.stderr + killed
    return json.loads(lines[0].removeprefix("RESULT ")), proc.stderr


def run_interleaved(script: str, specs: list[dict], repeats: int, label=lambda spec: str(spec)) -> list[list[dict]]:
    """Every spec `repeats` times, interleaved (round r runs spec 0, 1, ..., then round r + 1), each in its own
    process. Returns the successful results of each spec; a failure is printed with its stderr and raises
    SystemExit (non-zero) once every run has been tried."""
    results: list[list[dict]] = [[] for _ in specs]
    failed = []
    for round_ in range(repeats):
        for i, spec in enumerate(specs):
            result, stderr = run_isolated(script, spec)
            if result is None:
                failed.append(f"{label(spec)} (round {round_ + 1})")
                print(f"{label(spec)}: FAILED\n{stderr[-2000:]}", file=sys.stderr, flush=True)
            else:
                results[i].append(result)
    if failed:
        sys.exit(f"FAILED: {'; '.join(failed)}")
    return results


@dataclass(frozen=True)
class Spread:
    """Repeated measurements of one quantity: their median and range."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def __str__(self) -> str:
        return f"{self.median:.4g} [{self.low:.4g}–{self.high:.4g}]"


def ratio(a: Spread, b: Spread) -> str:
    """a / b: the ratio of the medians where the ranges of a and b do not overlap, else "not resolved" with the
    range of ratios the runs allow."""
    if a.low > b.high or a.high < b.low:
        return f"{a.median / b.median:.3f}x"
    return f"not resolved (spreads overlap: {a.low / b.high:.3f}–{a.high / b.low:.3f}x)"


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


class MemoryPhases:
    """Peak memory of each named phase of a measurement, and the memory in use at its end. CPU: the process's
    resident set (VmHWM / VmRSS of /proc/self/status; the high-water mark is reset at each phase's start by
    writing 5 to /proc/self/clear_refs); CUDA: torch.cuda.max_memory_allocated / memory_allocated."""

    def __init__(self, device):
        self.device, self.peak, self.end = device, {}, {}

    @contextmanager
    def phase(self, name: str):
        self._reset_peak()
        yield
        self.peak[name], self.end[name] = self._read()

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def _read(self) -> tuple[int, int]:
        if self.device.type == "cuda":
            import torch

            return torch.cuda.max_memory_allocated(self.device), torch.cuda.memory_allocated(self.device)
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        kib = lambda key: int(fields[key].split()[0]) * 1024  # noqa: E731
        return kib("VmHWM"), kib("VmRSS")
