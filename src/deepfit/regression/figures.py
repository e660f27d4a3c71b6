"""Regression figures as matplotlib Figures (Agg): the loss curve, predicted against actual with
the identity line, residuals, and the lesson's scatter of one feature with the fitted line."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Row = dict[str, float]


def new_figure(columns: int, *, width: float = 5.0) -> tuple[Figure, list[Any]]:
    from deepfit.plots import plt  # the Agg backend is chosen there

    fig, axes = plt.subplots(1, columns, figsize=(width * columns, 4), layout="constrained", squeeze=False)
    return fig, list(axes[0])


def plot_regression_curves(rows: list[Row]) -> Figure:
    """Train and validation loss (the optimised, standardised loss) and validation R^2 per epoch."""
    fig, (ax_loss, ax_r2) = new_figure(2, width=6.0)
    epochs = [row["epoch"] for row in rows]
    for key, style in (("train_loss", "-"), ("val_loss", "--")):
        values = [row.get(key, math.nan) for row in rows]
        if not all(math.isnan(v) for v in values):
            ax_loss.plot(epochs, values, style, label=key.replace("_", " "))
    ax_loss.set(title="Loss", xlabel="epoch", yscale="log")
    ax_loss.legend()
    r2 = [row.get("val_r2", math.nan) for row in rows]
    ax_r2.plot(epochs, r2, "-", color="tab:green")
    ax_r2.set(title="Validation R²", xlabel="epoch", ylim=(max(-1.0, min([v for v in r2 if not math.isnan(v)], default=0.0)), 1.0))
    for ax in (ax_loss, ax_r2):
        ax.grid(alpha=0.3)
    return fig


def plot_predicted_vs_actual(predicted: np.ndarray, actual: np.ndarray, *, target: str, title: str = "test split") -> Figure:
    """Each row as a point (actual, predicted); a perfect model lies on the dashed identity line."""
    fig, (ax,) = new_figure(1)
    ax.scatter(actual, predicted, s=14, alpha=0.7)
    low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
    ax.plot([low, high], [low, high], "--", color="black", linewidth=1, label="identity (predicted = actual)")
    ax.set(title=f"Predicted vs actual {target} ({title})", xlabel=f"actual {target}", ylabel=f"predicted {target}")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return fig


def plot_residuals(predicted: np.ndarray, actual: np.ndarray, *, target: str) -> Figure:
    """Residual (actual - predicted) against the prediction, and their histogram."""
    residual = actual - predicted
    fig, (ax_scatter, ax_hist) = new_figure(2)
    ax_scatter.scatter(predicted, residual, s=14, alpha=0.7)
    ax_scatter.axhline(0.0, color="black", linewidth=1, linestyle="--")
    ax_scatter.set(title="Residuals", xlabel=f"predicted {target}", ylabel="actual - predicted")
    ax_hist.hist(residual, bins=min(30, max(5, len(residual) // 4)), color="tab:orange", alpha=0.8)
    ax_hist.set(title=f"Residual distribution (RMSE {np.sqrt(np.mean(residual**2)):.3g})", xlabel="actual - predicted", ylabel="rows")
    for ax in (ax_scatter, ax_hist):
        ax.grid(alpha=0.3)
    return fig


def plot_feature_fit(
    x: np.ndarray, y: np.ndarray, line_x: np.ndarray, line_y: np.ndarray, *, feature: str, target: str, note: str
) -> Figure:
    """The lesson's picture: the data points of one feature against the target, and the model's fitted line."""
    fig, (ax,) = new_figure(1, width=6.0)
    ax.scatter(x, y, s=14, alpha=0.6, label="data")
    ax.plot(line_x, line_y, color="tab:red", linewidth=2, label="model")
    ax.set(title=f"{target} against {feature}{note}", xlabel=feature, ylabel=target)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return fig


def plot_table(features: np.ndarray, target: np.ndarray, names: list[str], *, target_name: str, title: str, most: int = 12) -> Figure:
    """Each feature against the target, one scatter per feature (at most `most`, the most correlated
    first), its Pearson r in the panel's title: a table's first look, as a grid of samples is an
    image set's."""
    from deepfit.plots import plt

    r = [pearson(features[:, j], target) for j in range(features.shape[1])]
    order = sorted(range(len(names)), key=lambda j: -abs(r[j]) if not math.isnan(r[j]) else 0.0)[: max(1, most)]
    columns = min(4, len(order))
    rows = math.ceil(len(order) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.9 * rows), layout="constrained", squeeze=False)
    for ax, j in zip(axes.flat, order, strict=False):
        ax.scatter(features[:, j], target, s=6, alpha=0.5)
        ax.set_title(f"{names[j]}  (r = {r[j]:.2f})" if not math.isnan(r[j]) else names[j], fontsize=9)
        ax.set_ylabel(target_name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(order) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """The correlation of two columns; NaN when either is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])
