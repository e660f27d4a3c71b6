"""Figures as matplotlib Figures on the Agg backend; saving is the caller's choice."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from deepfit.errors import ConfigError
from deepfit.outfiles import require_output

Row = dict[str, float]

# Fonts matplotlib falls back to, glyph by glyph, for class names in any script: the Hangul font
# packaged with koreanize-matplotlib (a dependency; NanumGothic, SIL OFL), then the system's Noto CJK
# or Nanum fonts where a distribution installed them. DejaVu Sans stays first for Latin text.
FALLBACK_FONTS = ("NanumGothic", "Noto Sans CJK KR", "Noto Sans CJK JP", "Noto Sans CJK SC")


def use_fallback_fonts() -> list[str]:
    """Register the packaged Hangul font and append the fallback fonts found to font.family;
    returns the families now listed. Called once, when this module is imported for a figure."""
    import importlib.util

    from matplotlib import font_manager

    spec = importlib.util.find_spec("koreanize_matplotlib")  # found, not imported: its import restyles matplotlib
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        for font in sorted(Path(folder, "fonts").glob("NanumGothic.ttf")):
            font_manager.fontManager.addfont(str(font))
    known = {entry.name for entry in font_manager.fontManager.ttflist}
    families = list(matplotlib.rcParams["font.family"])
    families += [name for name in FALLBACK_FONTS if name in known and name not in families]
    matplotlib.rcParams["font.family"] = families
    return families


use_fallback_fonts()


def plot_curves(rows: list[Row], *, lrs: list[tuple[float, float]] | None = None) -> Figure:
    """Loss and accuracy per epoch, train against validation, and the learning rate: after every
    batch when `lrs` (fractional epoch, lr) is given, else at each epoch's end."""
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
    if lrs:
        ax_lr.plot([epoch for epoch, _ in lrs], [lr for _, lr in lrs], "-", color="tab:green", linewidth=1.5)
        ax_lr.set_title("Learning rate (per step)")
    else:
        ax_lr.plot(epochs, [row["lr"] for row in rows], "-o", color="tab:green", markersize=4)
        ax_lr.set_title("Learning rate (end of epoch)")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_yscale("log")
    ax_lr.grid(alpha=0.3)
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs are whole numbers
        if epochs:
            low = min([*epochs, *(epoch for epoch, _ in lrs or [])])  # per-step points start inside epoch 1 (0..1)
            ax.set_xlim(min(low, min(epochs) - 0.5), max(epochs) + 0.5)  # a one-epoch run gets tick "1", not 0.96..1.04
    return fig


def save_figure(fig: Figure, path: Path, *, dpi: int = 110) -> Path:
    """`fig` into `path` in the format its suffix names (matplotlib's: .png, .pdf, .svg, ...)."""
    try:
        require_output(path, what="a figure", suffixes=[f".{s}" for s in fig.canvas.get_supported_filetypes()])
    except ConfigError:
        plt.close(fig)
        raise
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


def image_for_display(image: np.ndarray) -> np.ndarray:
    """uint8 or float (C, H, W) -> (H, W) for one channel, (H, W, 3) for three, as imshow wants."""
    array = np.asarray(image)
    if array.ndim == 2:
        return array
    if array.shape[0] == 1:
        return array[0]
    return np.moveaxis(array[:3], 0, -1)


def grid_shape(count: int, *, max_cols: int = 8) -> tuple[int, int]:
    """(rows, cols) of a near-square grid holding `count` panels, with the fewest empty cells
    (32 -> 4x8 rather than 6x6 with four spare)."""
    narrowest = max(1, min(max_cols, math.ceil(math.sqrt(count))))
    cols = min(range(narrowest, max(narrowest, max_cols) + 1), key=lambda c: (math.ceil(count / c) * c - count, c))
    return max(1, math.ceil(count / cols)), cols


def image_grid(count: int, *, panel: float = 1.6, max_cols: int = 8, title_space: float = 0.45) -> tuple[Figure, list[Axes]]:
    """A figure with `count` image panels (spare grid cells hidden); panel size in inches."""
    rows, cols = grid_shape(count, max_cols=max_cols)
    width = max(cols * panel, 5.5)  # inches: wide enough for the suptitle even with one panel
    fig, axes = plt.subplots(rows, cols, figsize=(width, rows * (panel + title_space)), squeeze=False, layout="constrained")
    flat = list(axes.flat)
    for ax in flat:
        ax.set_axis_off()
    return fig, flat[:count]


def show_image(ax: Axes, image: np.ndarray) -> None:
    """Grey images with a grey colour map on a fixed 0..255 scale; colour images as they are."""
    shown = image_for_display(image)
    if shown.ndim == 2:
        ax.imshow(shown, cmap="gray", vmin=0, vmax=255 if shown.dtype == np.uint8 else None)
    else:
        ax.imshow(shown)


def plot_predictions(
    images: np.ndarray, labels: np.ndarray, preds: np.ndarray, classes: list[str], *, probs: np.ndarray | None = None
) -> Figure:
    """A grid of images (N, C, H, W) titled 'predicted / true'; mistakes in red, hits in green.

    `probs` (N,), when given, is the predicted class's probability, shown after its name.
    """
    fig, axes = image_grid(len(images))
    for i, ax in enumerate(axes):
        show_image(ax, images[i])
        wrong = int(preds[i]) != int(labels[i])
        confidence = f" {float(probs[i]):.0%}" if probs is not None else ""
        title = f"{classes[int(preds[i])]}{confidence}\n/ {classes[int(labels[i])]}"
        ax.set_title(title, fontsize=8, color=MISTAKE_COLOR if wrong else HIT_COLOR)
    correct = int(np.sum(np.asarray(preds) == np.asarray(labels)))
    fig.suptitle(f"predicted / true: {correct} of {len(images)} right (mistakes in red)", fontsize=10)
    return fig


def plot_samples(images: np.ndarray, labels: np.ndarray, classes: list[str], *, title: str | None = None) -> Figure:
    """A grid of images (N, C, H, W) uint8, each titled with its class name."""
    fig, axes = image_grid(max(len(images), 1))
    for i, ax in enumerate(axes[: len(images)]):
        show_image(ax, images[i])
        ax.set_title(classes[int(labels[i])], fontsize=8)
    if len(images) == 0:
        axes[0].text(0.5, 0.5, "no images", ha="center", va="center", fontsize=12)
    fig.suptitle(title or f"{len(images)} samples and their labels", fontsize=10)
    return fig


MISTAKE_COLOR = "#d62728"  # red
HIT_COLOR = "#2ca02c"  # green


def plot_mistakes(
    images: np.ndarray, labels: np.ndarray, preds: np.ndarray, classes: list[str], *, probs: np.ndarray, losses: np.ndarray
) -> Figure:
    """The wrong predictions given, most confident first: 'predicted p / true, loss' over each image."""
    fig, axes = image_grid(max(len(images), 1), title_space=0.6)
    for i, ax in enumerate(axes[: len(images)]):
        show_image(ax, images[i])
        title = f"{classes[int(preds[i])]} {float(probs[i]):.0%}\n/ {classes[int(labels[i])]}\nloss {float(losses[i]):.2f}"
        ax.set_title(title, fontsize=8, color=MISTAKE_COLOR)
    if len(images) == 0:
        axes[0].text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=12)
    fig.suptitle("Top losses: most confident wrong predictions (predicted p / true)", fontsize=10)
    return fig


def plot_filters(weight: np.ndarray, *, title: str = "", max_panels: int = 256) -> Figure:
    """Convolution weights (out, in, kh, kw): one small image per filter and input channel.

    Rows are filters and columns input channels (a single input channel is laid out as a
    near-square grid instead). All panels share one symmetric colour scale around 0, shown by
    one colour bar, so signs and sizes compare across panels. Beyond `max_panels` only the first
    filters are drawn and the title says so.
    """
    w = np.asarray(weight, dtype=np.float32)
    out_ch, in_ch = w.shape[:2]
    shown_filters = max(1, min(out_ch, max_panels // in_ch)) if in_ch <= max_panels else 1
    shown_inputs = min(in_ch, max_panels)
    panels = [(f, c) for f in range(shown_filters) for c in range(shown_inputs)]
    if in_ch == 1:
        rows, cols = grid_shape(len(panels), max_cols=16)
    else:
        rows, cols = shown_filters, shown_inputs
    limit = float(np.abs(w).max()) or 1.0
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(4.0, cols * 0.6 + 1.2), max(2.0, rows * 0.6 + 0.8)), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (f, c) in zip(axes.flat, panels, strict=False):
        ax.imshow(w[f, c], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
    scale = ScalarMappable(norm=Normalize(-limit, limit), cmap="RdBu_r")
    fig.colorbar(scale, ax=axes, shrink=0.8, label="weight")
    note = "" if len(panels) == out_ch * in_ch else f" (first {shown_filters} of {out_ch} filters x {shown_inputs} of {in_ch} inputs)"
    layout = "one panel per filter" if in_ch == 1 else "rows: filters, columns: input channels"
    fig.suptitle(f"{title or 'Filters'}: {out_ch}x{in_ch}x{w.shape[2]}x{w.shape[3]}, {layout}{note}", fontsize=10)
    return fig


def plot_features(maps: np.ndarray, *, image: np.ndarray | None = None, title: str = "", max_maps: int = 64) -> Figure:
    """Feature maps (C, H, W) of one image, one panel per channel (the first `max_maps`),
    each on its own colour scale, after the input image when it is given."""
    m = np.asarray(maps, dtype=np.float32)
    shown = min(len(m), max_maps)
    extra = 1 if image is not None else 0
    fig, axes = image_grid(shown + extra, panel=1.3, max_cols=10, title_space=0.3)
    if image is not None:
        show_image(axes[0], image)
        axes[0].set_title("input", fontsize=8)
    for i in range(shown):
        ax = axes[i + extra]
        ax.imshow(m[i], cmap="viridis", interpolation="nearest")
        ax.set_title(f"{i}", fontsize=7)
    note = "" if shown == len(m) else f" (first {shown} of {len(m)} channels)"
    fig.suptitle(f"{title or 'Feature maps'}: {len(m)} channels of {m.shape[1]}x{m.shape[2]}{note}", fontsize=10)
    return fig


def plot_gradcam(images: np.ndarray, heatmaps: np.ndarray, titles: list[str], *, alpha: float = 0.45) -> Figure:
    """Grad-CAM heat maps (N, H, W), scaled 0..1, laid over their images (N, C, H, W)."""
    fig, axes = image_grid(len(images), panel=1.8, title_space=0.5)
    for i, ax in enumerate(axes):
        show_image(ax, images[i])
        ax.imshow(heatmaps[i], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
        ax.set_title(titles[i], fontsize=8)
    fig.suptitle("Grad-CAM: where the evidence for the class lies (red = most)", fontsize=10)
    return fig


def figure_png(fig: Figure, *, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (for embedding), closed afterwards."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()
