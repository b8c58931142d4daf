"""One metrics interface: JSONL (the record of truth) + TensorBoard (+ Weights & Biases where asked), and
the loss plot of a run."""
from __future__ import annotations

import json
import math
import resource
from dataclasses import dataclass
from pathlib import Path

from curvtrain.models.files import write_text_atomic

METRICS = "metrics.jsonl"


@dataclass(kw_only=True)
class WandbConfig:
    """An optional Weights & Biases run mirroring the metrics (pip install 'curvtrain[wandb]')."""

    project: str = ""
    """The W&B project; empty: no W&B logging."""
    mode: str = "online"
    """"online" (to the W&B server), "offline" (files in RUN_DIR/wandb, `wandb sync` uploads them later)."""
    entity: str = ""
    """The W&B user or team; empty: the logged-in user's default."""

    def __post_init__(self):
        if self.mode not in ("online", "offline"):
            raise ValueError(f"mode must be 'online' or 'offline', got {self.mode!r}")
        if self.project:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ValueError("run.wandb.project is set but wandb is not installed: pip install 'curvtrain[wandb]'") from None


class MetricsLogger:
    """Appends one JSON object per record to RUN_DIR/metrics.jsonl and mirrors scalars to TensorBoard,
    indexed by the record's `step_key` ("step" for pretraining, "round" for federated runs).

    `start_step` is the step the run continues from (0, or a checkpoint's): metrics.jsonl was truncated
    there (`truncate_metrics`), and TensorBoard is told to purge its events after it (purge_step), so a
    resumed or restarted run shows each step once.

    With `wandb.project` set, scalars also go to a W&B run in RUN_DIR/wandb named after the run directory."""

    def __init__(self, run_dir: Path, start_step: int = 0, step_key: str = "step", wandb: WandbConfig | None = None,
                 config: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.step_key = step_key
        self.path = Path(run_dir) / METRICS
        self.file = open(self.path, "a", buffering=1)
        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        self.wandb = None
        if wandb is not None and wandb.project:
            import wandb as wb

            self.wandb = wb.init(project=wandb.project, entity=wandb.entity or None, mode=wandb.mode,
                                 dir=str(run_dir), name=Path(run_dir).name, config=config)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(finite_or_none(record)) + "\n")  # NaN and inf as null: metrics.jsonl stays JSON
        scalars = {k: v for k, v in record.items() if k != self.step_key and isinstance(v, (int, float))}
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, record[self.step_key])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record[self.step_key])

    def close(self) -> None:
        self.file.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


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
