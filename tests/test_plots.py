"""Figures: what each one shows (cell counts, panel counts, title colours), not only that it draws."""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix

from deepfit import plots

CLASSES = ["zero", "one", "two", "three"]


def image_axes(fig: Figure) -> list:  # type: ignore[type-arg]
    """Axes that show an image panel (colour bars excluded)."""
    return [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]


def cell_texts(fig: Figure) -> dict[tuple[int, int], str]:
    """(row, col) -> the text written in that cell of the confusion heat map."""
    ax = image_axes(fig)[0]
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}


def test_confusion_cells_carry_the_counts_of_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    preds = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 4, 300))
    matrix = confusion_matrix(labels, preds, labels=range(4))
    fig = plots.plot_confusion(matrix, CLASSES)
    texts = cell_texts(fig)
    assert len(texts) == 16
    for (i, j), text in texts.items():
        assert int(text) == matrix[i, j]
    assert np.array_equal(image_axes(fig)[0].images[0].get_array(), matrix)
    assert [t.get_text() for t in image_axes(fig)[0].get_xticklabels()] == CLASSES


def test_confusion_normalised_rows_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 200)
    preds = np.where(rng.random(200) < 0.5, labels, rng.integers(0, 4, 200))
    expected = confusion_matrix(labels, preds, labels=range(4), normalize="true")
    fig = plots.plot_confusion(confusion_matrix(labels, preds, labels=range(4)), CLASSES, normalize=True)
    for (i, j), text in cell_texts(fig).items():
        assert float(text) == pytest.approx(expected[i, j], abs=0.006)
    assert "normalised" in fig.axes[0].get_title()


def test_confusion_empty_row_stays_zero_when_normalised() -> None:
    matrix = np.array([[3, 1], [0, 0]])
    texts = cell_texts(plots.plot_confusion(matrix, ["a", "b"], normalize=True))
    assert texts[(1, 0)] == "0.00" and texts[(0, 0)] == "0.75"


def same_colour(a: object, b: str) -> bool:
    return mcolors.to_hex(a) == mcolors.to_hex(b)  # type: ignore[arg-type]


def test_predictions_grid_marks_mistakes_red() -> None:
    images = np.random.default_rng(0).integers(0, 255, (6, 1, 8, 8), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 0, 1])
    preds = np.array([0, 2, 2, 1, 0, 1])  # wrong at 1 and 3
    fig = plots.plot_predictions(images, labels, preds, CLASSES, probs=np.full(6, 0.5))
    axes = image_axes(fig)
    assert len(axes) == 6
    for ax, label, pred in zip(axes, labels, preds, strict=True):
        title = ax.title
        assert title.get_text().startswith(CLASSES[pred]) and title.get_text().endswith(CLASSES[label])
        assert same_colour(title.get_color(), plots.MISTAKE_COLOR if label != pred else plots.HIT_COLOR)
        assert np.array_equal(ax.images[0].get_array(), images[list(axes).index(ax), 0])
    assert "4 of 6 right" in fig.get_suptitle()


def test_mistakes_are_red_and_show_their_loss() -> None:
    images = np.zeros((3, 3, 8, 8), dtype=np.uint8)
    fig = plots.plot_mistakes(
        images, np.array([0, 1, 2]), np.array([1, 2, 3]), CLASSES, probs=np.array([0.9, 0.8, 0.7]), losses=np.array([5.0, 4.0, 3.0])
    )
    axes = image_axes(fig)
    assert len(axes) == 3
    assert all(same_colour(ax.title.get_color(), plots.MISTAKE_COLOR) for ax in axes)
    assert "loss 5.00" in axes[0].title.get_text() and axes[0].images[0].get_array().shape == (8, 8, 3)


def test_mistakes_without_mistakes_says_so() -> None:
    fig = plots.plot_mistakes(np.zeros((0, 1, 8, 8)), np.zeros(0), np.zeros(0), CLASSES, probs=np.zeros(0), losses=np.zeros(0))
    assert any("no mistakes" in t.get_text() for ax in fig.axes for t in ax.texts)


@pytest.mark.parametrize("shape", [(6, 1, 3, 3), (4, 3, 5, 5), (32, 1, 3, 3)])
def test_filters_one_panel_per_filter_and_input_channel(shape: tuple[int, int, int, int]) -> None:
    weight = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    fig = plots.plot_filters(weight)
    axes = image_axes(fig)
    assert len(axes) == shape[0] * shape[1]
    shown = sorted(ax.images[0].get_array().tobytes() for ax in axes)
    assert shown == sorted(weight[f, c].tobytes() for f in range(shape[0]) for c in range(shape[1]))
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1
    limit = float(np.abs(weight).max())
    assert all(ax.images[0].get_clim() == pytest.approx((-limit, limit)) for ax in axes)  # one shared scale


def test_filters_with_many_panels_are_capped_and_say_so() -> None:
    fig = plots.plot_filters(np.ones((64, 32, 3, 3), dtype=np.float32), max_panels=256)
    assert len(image_axes(fig)) == 8 * 32
    assert "first 8 of 64 filters" in fig.get_suptitle()


def test_features_one_panel_per_channel_after_the_input() -> None:
    maps = np.random.default_rng(0).normal(size=(5, 4, 4)).astype(np.float32)
    image = np.zeros((1, 8, 8), dtype=np.uint8)
    axes = image_axes(plots.plot_features(maps, image=image))
    assert len(axes) == 6
    assert axes[0].title.get_text() == "input"
    for i in range(5):
        assert np.array_equal(axes[i + 1].images[0].get_array(), maps[i])


def test_gradcam_lays_each_heat_map_over_its_image() -> None:
    images = np.zeros((2, 1, 6, 6), dtype=np.uint8)
    heat = np.random.default_rng(0).random((2, 6, 6))
    axes = image_axes(plots.plot_gradcam(images, heat, ["a", "b"]))
    assert len(axes) == 2
    assert all(len(ax.images) == 2 for ax in axes)
    assert np.array_equal(axes[1].images[1].get_array(), heat[1])


@pytest.mark.parametrize("count", [1, 2, 5, 8, 24, 32, 33, 100])
def test_grid_holds_every_panel_with_less_than_a_row_spare(count: int) -> None:
    rows, cols = plots.grid_shape(count)
    assert rows * cols >= count and rows * cols - count < cols and cols <= 8


def test_figure_png_is_a_png() -> None:
    assert plots.figure_png(plots.plot_confusion(np.eye(2), ["a", "b"])).startswith(b"\x89PNG")


def test_curves_mark_whole_epochs_only() -> None:
    row = {"epoch": 1.0, "train_loss": 0.5, "val_loss": 0.4, "train_acc": 0.8, "val_acc": 0.85, "lr": 1e-3}
    fig = plots.plot_curves([row])
    fig.canvas.draw()
    for ax in fig.axes:
        visible = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert visible == [1.0]
