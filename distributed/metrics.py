"""One metrics interface: JSONL (the record of truth) + TensorBoard, and the loss plot of a run."""
from __future__ import annotations

import json
import math
import resource
from pathlib import Path

from curvtrain.models.files import write_text_atomic

METRICS = "metrics.jsonl"


class MetricsLogger:
    """Appends one JSON object per record to RUN_DIR/metrics.jsonl and mirrors scalars to TensorBoard,
    indexed by the record's `step_key` ("step" for pretraining, "round" for federated runs).

    `start_step` is the step the run continues from (0, or a checkpoint's): metrics.jsonl was truncated
    there (`truncate_metrics`), and TensorBoard is told to purge its events after it (purge_step), so a
    resumed or restarted run shows each step once."""

    def __init__(self, run_dir: Path, start_step: int = 0, step_key: str = "step"):
        from torch.utils.tensorboard import SummaryWriter

        self.step_key = step_key
        self.path = Path(run_dir) / METRICS
        self.file = open(self.path, "a", buffering=1)
        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(finite_or_none(record)) + "\n")  # NaN and inf as null: metrics.jsonl stays JSON
        for key, value in record.items():
            if key != self.step_key and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record[self.step_key])

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def finite_or_none(record: dict) -> dict:
    """A record with every non-finite float (a diverged loss) as None, written as JSON null: JSON has no NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def peak_memory_bytes(device) -> int:
    """Peak memory of this process so far on `device` (a torch.device): allocated on a GPU (since the
    last reset of its peak statistics), else the process's peak RSS."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, last_step: int, step_key: str = "step") -> None:
    """Drop records after `last_step` (a restart from that checkpoint will write them again)."""
    path = Path(run_dir) / METRICS
    if path.is_file():
        kept = [r for r in read_metrics(run_dir) if r[step_key] <= last_step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_series(run_dir: Path, name: str, x: str, series: dict[str, tuple[str, str]], ylabel: str) -> Path | None:
    """RUN_DIR/<name>.png: each metric of `series` ({key: (label, matplotlib style)}) against record field `x`;
    None (no file) when no record has any of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    points = {key: [(r[x], r[key]) for r in records if r.get(key) is not None] for key in series}  # null: not finite
    if not any(points.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, (label, style) in series.items():
        if points[key]:
            ax.plot(*zip(*points[key]), style, label=label, lw=1, ms=3)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / f"{name}.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_losses(run_dir: Path) -> Path | None:
    """RUN_DIR/loss.png: training loss per step and validation loss at evaluation steps."""
    series = {"loss": ("train loss", "-"), "val_loss": ("validation loss", "o-")}
    return plot_series(run_dir, "loss", "step", series, "cross-entropy (nats/token)")
