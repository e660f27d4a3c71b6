"""Figures as matplotlib Figures on the Agg backend; saving is the caller's choice."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
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


def plot_confusion(matrix: np.ndarray, classes: list[str], *, normalize: bool = False) -> Figure:
    """Confusion matrix as a heat map, rows = true class, columns = predicted, a count in each cell.

    With normalize=True each row is divided by its total, so a cell reads "fraction of this true
    class predicted as that class" (empty rows stay 0).
    """
    counts = np.asarray(matrix, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    values = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0) if normalize else counts
    n = len(classes)
    side = max(4.0, 0.55 * n + 2.5)  # inches: cells stay readable from 2 to ~30 classes
    fig, ax = plt.subplots(figsize=(side + 1.0, side), layout="constrained")
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(float(values.max()), 1.0))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else ""))
    _annotate_cells(ax, values, normalize=normalize)
    return fig


def _annotate_cells(ax: Axes, values: np.ndarray, *, normalize: bool) -> None:
    """Write each cell's value; white text on dark cells so it stays legible."""
    n = values.shape[0]
    fontsize = 9 if n <= 12 else max(5, 9 - (n - 12) // 4)
    threshold = values.max() / 2.0 if values.size else 0.0
    for i in range(n):
        for j in range(values.shape[1]):
            value = values[i, j]
            text = f"{value:.2f}" if normalize else f"{value:.0f}"
            color = "white" if value > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)
