"""The regression figures of a trained model and its data, by kind (for `deepfit show` and the
report), and all of them saved into a run's plots/ folder after training."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from deepfit.errors import DeepfitError
from deepfit.regression.batches import predict_values
from deepfit.regression.figures import plot_feature_fit, plot_predicted_vs_actual, plot_regression_curves, plot_residuals
from deepfit.regression.split import RegressionData, Split

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from deepfit.regression.trained import RegressionModel

Row = dict[str, float]
FIGURE_KINDS = ("curves", "predicted", "residuals", "feature")
LINE_POINTS = 200  # samples along the fitted line (a curve for the mlp)


def shown_split(data: RegressionData) -> tuple[Split, str]:
    """The test split, or the validation or training split when there is none."""
    for split, name in ((data.test, "test split"), (data.val, "validation split")):
        if split is not None:
            return split, name
    return data.train, "training split"


def predictions(model: nn.Module, data: RegressionData, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, actual) for a split, in the target's units."""
    predicted = data.scaling.undo_target(predict_values(model, split.x)).numpy()
    return predicted, data.table.target[split.rows]


def chosen_feature(data: RegressionData) -> int:
    """The feature most correlated with the target on the training rows (the only one for `line`)."""
    x, y = data.table.features[data.train.rows], data.table.target[data.train.rows]
    spread = x.std(axis=0) > 0
    if x.shape[1] == 1 or not spread.any():
        return 0
    centred = (x - x.mean(axis=0))[:, spread]
    corr = np.abs(centred.T @ (y - y.mean())) / (np.linalg.norm(centred, axis=0) * np.linalg.norm(y - y.mean()) + 1e-12)
    return int(np.flatnonzero(spread)[int(corr.argmax())])


def feature_figure(model: nn.Module, data: RegressionData) -> Figure:
    """The data of one feature against the target, and the model's prediction along that feature
    with every other feature held at its training mean."""
    j = chosen_feature(data)
    column = data.table.features[:, j]
    grid = np.linspace(column.min(), column.max(), LINE_POINTS)
    x = torch.zeros(LINE_POINTS, data.num_features)  # standardised 0 = the training mean
    x[:, j] = torch.from_numpy((grid - data.scaling.mean[j]) / data.scaling.std[j]).float()
    line = data.scaling.undo_target(predict_values(model, x)).numpy()
    names = data.table.feature_names
    note = " (other features at their training mean)" if len(names) > 1 else ""
    return plot_feature_fit(column, data.table.target, grid, line, feature=names[j], target=data.table.schema.target, note=note)


def make_regression_figure(kind: str, model: nn.Module, data: RegressionData, history: list[Row]) -> Figure:
    """One figure by kind: curves, predicted, residuals or feature."""
    if kind == "curves":
        if not history:
            raise DeepfitError("this run has no finished epoch to draw curves of")
        return plot_regression_curves(history)
    if kind in ("predicted", "residuals"):
        split, name = shown_split(data)
        predicted, actual = predictions(model, data, split)
        target = data.table.schema.target
        if kind == "predicted":
            return plot_predicted_vs_actual(predicted, actual, target=target, title=name)
        return plot_residuals(predicted, actual, target=target)
    if kind == "feature":
        return feature_figure(model, data)
    raise DeepfitError(f"unknown figure {kind!r} for a regression run; valid: {', '.join(FIGURE_KINDS)}")


def save_run_figures(model: nn.Module, data: RegressionData, history: list[Row], folder: Path) -> list[Path]:
    from deepfit.plots import save_figure

    kinds = [kind for kind in FIGURE_KINDS if kind != "curves" or history]
    return [save_figure(make_regression_figure(kind, model, data, history), folder / f"{kind}.png") for kind in kinds]


def load_regression_run(path: str | Path, *, data_path: str | None = None) -> tuple[RegressionModel, RegressionData, Path]:
    """A regression checkpoint's model, its run's data rebuilt from the saved config (from
    `data_path`, where its CSV moved), and the folder figures go to."""
    from deepfit.regression.sources import anchored, load_regression_data
    from deepfit.regression.trained import load_regression_model

    trained = load_regression_model(path)
    config = trained.config
    if data_path is not None:
        config = anchored(dataclasses.replace(config, data=dataclasses.replace(config.data, name=data_path, dir=None)))
    data = load_regression_data(config)
    given = Path(path)
    run_dir = given if given.is_dir() else trained.path.parent.parent if trained.path.parent.name == "checkpoints" else trained.path.parent
    return trained, data, run_dir
