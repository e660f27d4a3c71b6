"""A table split into seeded train/val/test rows and standardised with statistics of the
training rows only (the val and test rows never leak into the mean and std)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deepfit.errors import DataError
from deepfit.history import plural
from deepfit.regression.table import Table

MIN_TRAIN_ROWS = 2  # a mean and a spread need two rows


@dataclass(frozen=True)
class Scaling:
    """x_std = (x - mean) / std per feature, y_std = (y - target_mean) / target_std; identity when not standardising."""

    mean: list[float]  # per feature, in the file's units
    std: list[float]
    target_mean: float
    target_std: float

    def features(self, x: np.ndarray) -> torch.Tensor:
        """(N, F) file units -> standardised float32."""
        return torch.from_numpy((x - np.asarray(self.mean)) / np.asarray(self.std)).float()

    def target(self, y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((y - self.target_mean) / self.target_std).float()

    def undo_target(self, y: torch.Tensor) -> torch.Tensor:
        """Standardised predictions -> the target's units (float64 for exact metrics)."""
        return y.double() * self.target_std + self.target_mean


@dataclass
class Split:
    x: torch.Tensor  # (N, F) standardised float32
    y: torch.Tensor  # (N,) standardised float32
    rows: np.ndarray  # (N,) indices into the table

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class RegressionData:
    table: Table
    scaling: Scaling
    train: Split
    val: Split | None
    test: Split | None

    @property
    def num_features(self) -> int:
        return self.table.features.shape[1]


def split_rows(n: int, *, test_fraction: float, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded disjoint (train, val, test) row indices: test first, then val from the rest."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    n_val = round((n - n_test) * val_fraction)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    if len(train) < MIN_TRAIN_ROWS:
        raise DataError(
            f"only {plural(n, 'usable row')}: too few to split into train/val/test; the training split needs at least {MIN_TRAIN_ROWS}"
        )
    return np.sort(train), np.sort(val), np.sort(test)


def fit_scaling(table: Table, rows: np.ndarray, *, standardize: bool) -> Scaling:
    """Training-row statistics; a constant column keeps std 1 so it maps to 0 instead of NaN."""
    width = table.features.shape[1]
    if not standardize:
        return Scaling([0.0] * width, [1.0] * width, 0.0, 1.0)
    x, y = table.features[rows], table.target[rows]
    std = x.std(axis=0)
    target_std = float(y.std())
    return Scaling(x.mean(axis=0).tolist(), np.where(std > 0, std, 1.0).tolist(), float(y.mean()), target_std if target_std > 0 else 1.0)


def require_spread(table: Table, rows: np.ndarray) -> None:
    """A target with one value in every training row has nothing to learn (and no R^2)."""
    values = table.target[rows]
    if np.ptp(values) == 0:
        raise DataError(f"the target column {table.schema.target!r} is {values[0]:g} in every training row: there is nothing to learn")


def make_split(table: Table, rows: np.ndarray, scaling: Scaling) -> Split:
    return Split(scaling.features(table.features[rows]), scaling.target(table.target[rows]), rows)


def build_regression_data(table: Table, *, test_fraction: float, val_fraction: float, seed: int, standardize: bool) -> RegressionData:
    train, val, test = split_rows(len(table.target), test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)
    require_spread(table, train)
    scaling = fit_scaling(table, train, standardize=standardize)
    return RegressionData(
        table, scaling, make_split(table, train, scaling),
        make_split(table, val, scaling) if len(val) else None,
        make_split(table, test, scaling) if len(test) else None,
    )  # fmt: skip
