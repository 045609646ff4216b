"""What the main job leaves behind: metrics as JSON lines, loss-curve PNGs and the comparison table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """One JSON object per line. A resumed run appends, dropping lines past its resume step first, so the file
    holds each step once even when the first run got further than its last checkpoint."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(curves: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """One PNG: train loss per step (smoothed, and raw underneath) and validation loss, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for i, (name, records) in enumerate(curves.items()):
        colour = f"C{i}"
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(list(losses)), color=colour, label=f"{name} train")
        if val:
            steps, losses = zip(*val)
            ax.plot(steps, losses, "o--", color=colour, markersize=4, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Debiased exponential moving average, as training dashboards show."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def compare_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| optimizer | final train loss | final val loss | time (s) | optimizer share of step time |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['seconds']:.1f} | "
                     f"{100 * r['optimizer_share']:.0f}% |")
    return "\n".join(lines)
