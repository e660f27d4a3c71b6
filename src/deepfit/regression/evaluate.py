"""`deepfit evaluate` for regression checkpoints: MSE, RMSE, MAE and R^2 of a split (default the
run's seeded test split) or of another CSV with the target column, in the target's units;
report.json and the predicted-vs-actual and residual figures beside the run."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepfit.errors import DataError
from deepfit.regression.figures import plot_predicted_vs_actual, plot_residuals
from deepfit.regression.models import regression_metrics
from deepfit.regression.sources import load_table
from deepfit.regression.split import split_rows
from deepfit.regression.table import encode_rows, read_csv_rows
from deepfit.regression.trained import RegressionModel, load_regression_model

SPLITS = ("test", "val", "all")


@dataclass
class RegressionEvaluation:
    metrics: dict[str, float]  # mse, rmse, mae, r2 in the target's units
    rows: int  # rows scored
    split: str  # test, val, all, or the --data file
    report_path: Path
    figure_paths: list[Path]


def evaluate_regression(path: str | Path, *, data: str | None = None, split: str = "test") -> RegressionEvaluation:
    """Score a regression run folder or checkpoint; writes report.json and two figures."""
    trained = load_regression_model(path)
    features, target, described = scored_rows(trained, data, split)
    if len(target) == 0:
        raise DataError(f"the {described} has no rows to score")
    predicted = trained.predict(torch.from_numpy(features)).numpy()
    metrics = regression_metrics(torch.from_numpy(predicted), torch.from_numpy(target))
    report_path, figures = output_paths(Path(path), trained.path)
    report = {
        "task": "regression",
        "checkpoint": str(trained.path),
        "split": described,
        "target": trained.target,
        "rows": len(target),
        **{key: value if math.isfinite(value) else None for key, value in metrics.items()},  # R^2 of one row, or of equal targets: null
    }
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    save_figures(predicted, target, trained.target, described, figures)
    return RegressionEvaluation(metrics, len(target), described, report_path, figures)


def scored_rows(trained: RegressionModel, data: str | None, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(features, targets, description) of what to score, in the file's units."""
    if data is not None:
        header, rows = read_csv_rows(Path(data))
        absent = [c for c in [*trained.schema.columns, trained.target] if c not in header]
        if absent:
            raise DataError(f"{data}: lacks the column(s) {', '.join(absent)} this model needs")
        try:
            x, y, _ = encode_rows(trained.schema, header, rows, drop_missing=trained.config.data.drop_missing, path=Path(data))
        except ValueError as err:
            raise DataError(f"{data}: {err}") from None
        return x, y, f"file {data}"
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    config = trained.config
    table = load_table(config.data)
    if table.schema != trained.schema:
        raise DataError(f"{config.data.name} no longer has the columns this model was trained on; pass --data FILE")
    _, val, test = split_rows(
        len(table.target), test_fraction=config.data.test_fraction, val_fraction=config.data.val_fraction, seed=config.train.seed
    )
    chosen: np.ndarray = {"test": test, "val": val, "all": np.arange(len(table.target))}[split]
    return table.features[chosen], table.target[chosen], f"{split} split"


def output_paths(given: Path, checkpoint: Path) -> tuple[Path, list[Path]]:
    """In the run folder: report.json and plots/; beside a bare checkpoint: <stem>.report.json, <stem>.<figure>.png."""
    run_dir = given if given.is_dir() else (checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None)
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        return run_dir / "report.json", [run_dir / "plots" / "predicted.png", run_dir / "plots" / "residuals.png"]
    stem = checkpoint.with_suffix("")
    return stem.with_name(f"{stem.name}.report.json"), [stem.with_name(f"{stem.name}.{kind}.png") for kind in ("predicted", "residuals")]


def save_figures(predicted: np.ndarray, actual: np.ndarray, target: str, described: str, paths: list[Path]) -> None:
    from deepfit.plots import save_figure

    save_figure(plot_predicted_vs_actual(predicted, actual, target=target, title=described), paths[0])
    save_figure(plot_residuals(predicted, actual, target=target), paths[1])
