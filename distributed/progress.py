"""Progress of a run: a live bar where the user watches a terminal, a few plain lines where output goes to a file.

A worker's stdout is never a terminal, so the Ray driver tells its workers whether its own is
(`driver_env()`, set in their runtime environment). With a terminal, tqdm_ray: the driver renders the bar.
Without one, tqdm_ray would write every update as a carriage-return line, twice (an update, then a
refresh) through Ray's log forwarding; instead each worker prints plain lines, one per update, at most
PLAIN_UPDATES per run (and one at least every PLAIN_INTERVAL_S), which Ray forwards once each.
"""
from __future__ import annotations

import math
import os
import sys
import time

TTY_ENV = "CURVTRAIN_PROGRESS_TTY"
PLAIN_UPDATES = 10
PLAIN_INTERVAL_S = 300.0


def driver_env() -> dict[str, str]:
    """Environment variables for workers: whether this (the driver's) output is a terminal."""
    return {TTY_ENV: "1" if sys.stderr.isatty() else "0"}


class PlainProgress:
    """tqdm's update/set_postfix/close, printing `desc: step n/total (p%), r unit/s[, postfix]` lines: every
    ceil(total / PLAIN_UPDATES) units, after PLAIN_INTERVAL_S without a line, and at the end."""

    def __init__(self, initial: int, total: int, desc: str, unit: str):
        self.n, self.total, self.desc, self.unit = initial, total, desc, unit
        self.every = max(1, math.ceil(total / PLAIN_UPDATES))
        self.start = self.last_time = time.monotonic()
        self.initial = self.last_n = initial
        self.postfix = ""

    def set_postfix(self, values: dict) -> None:
        """Shown on the following lines (set it before the update it belongs to)."""
        self.postfix = "".join(f", {k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.n // self.every > self.last_n // self.every or now - self.last_time >= PLAIN_INTERVAL_S or self.n == self.total:
            self._print(now)

    def close(self) -> None:
        if self.n != self.last_n:
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        rate = (self.n - self.initial) / max(now - self.start, 1e-9)
        print(f"{self.desc}: {self.unit} {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%), "
              f"{rate:.2f} {self.unit}/s{self.postfix}", flush=True)
        self.last_n, self.last_time = self.n, now


def progress_bar(initial: int, total: int, desc: str = "train", unit: str = "step"):
    """tqdm_ray in a Ray worker whose driver shows a terminal, tqdm in a terminal outside Ray, else PlainProgress."""
    try:
        import ray
        from ray.experimental import tqdm_ray

        in_worker = ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE
    except ImportError:
        in_worker = False
    terminal = os.environ.get(TTY_ENV) == "1" if in_worker else sys.stderr.isatty()
    if not terminal:
        return PlainProgress(initial, total, desc, unit)
    if in_worker:
        bar = tqdm_ray.tqdm(total=total, desc=desc, unit=unit)
        bar.update(initial)
        return bar
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit)
