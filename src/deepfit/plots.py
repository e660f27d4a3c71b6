"""Figures as matplotlib Figures on the Agg backend; saving is the caller's choice."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

Row = dict[str, float]


def plot_curves(rows: list[Row]) -> Figure:
    """Loss and accuracy per epoch, train against validation, and the learning rate."""
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
    epochs = [row["epoch"] for row in rows]
    for ax, metric, title in ((ax_loss, "loss", "Loss"), (ax_acc, "acc", "Accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [row.get(f"{split}_{metric}", math.nan) for row in rows]
            if not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, style, label=split, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_lr.plot(epochs, [row["lr"] for row in rows], "-o", color="tab:green", markersize=4)
    ax_lr.set_title("Learning rate (end of epoch)")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_yscale("log")
    ax_lr.grid(alpha=0.3)
    return fig


def save_figure(fig: Figure, path: Path, *, dpi: int = 110) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
