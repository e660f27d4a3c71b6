"""Where regression tables come from: the embedded `line` and `diabetes` datasets, or a CSV file."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deepfit.config import Config, DataConfig
from deepfit.errors import DataError, moved_data_message
from deepfit.registry import Registry
from deepfit.regression.split import RegressionData, build_regression_data
from deepfit.regression.table import Schema, Table, load_csv_table

TABLES: Registry[Callable[[], Table]] = Registry("regression dataset")
LINE_POINTS = 200  # the lesson's synthetic points
LINE_SEED = 1  # the data are the same for every run; train.seed only changes the split and the init


@TABLES.register("line")
def load_line() -> Table:
    """The lesson's data: X ~ N(0, 10^2), y = X + 3 * noise, noise ~ N(0, 1); 200 points."""
    generator = torch.Generator().manual_seed(LINE_SEED)
    x = torch.randn(LINE_POINTS, 1, generator=generator, dtype=torch.float64) * 10
    y = x + 3 * torch.randn(LINE_POINTS, 1, generator=generator, dtype=torch.float64)
    return Table(x.numpy(), y[:, 0].numpy(), Schema(["x"], "y"), "line")


@TABLES.register("diabetes")
def load_diabetes() -> Table:
    """scikit-learn's bundled diabetes data (442 patients x 10 baseline variables, in their own
    units; target: disease progression one year later). Read from sklearn's package, no download."""
    from sklearn.datasets import load_diabetes as sklearn_diabetes

    bunch = sklearn_diabetes(scaled=False)
    names = [str(name) for name in bunch.feature_names]
    return Table(
        np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.float64), Schema(names, "progression"), "diabetes"
    )


TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz")  # the delimiter is read off the header (csvtext)


def is_csv(name: str) -> bool:
    return name.lower().endswith(TABLE_SUFFIXES)


def load_table(data: DataConfig) -> Table:
    """The table data.name names: an embedded dataset or a CSV file (data.dir is its folder when relative)."""
    if data.name in TABLES:
        table = TABLES.get(data.name)()
        if data.target and data.target != table.schema.target:
            raise DataError(f"{data.name} predicts {table.schema.target!r}; --target {data.target} is not its target")
        return select_features(table, data.features) if data.features else table
    if not is_csv(data.name):
        raise DataError(f"unknown regression dataset {data.name!r}; valid: {', '.join(TABLES.names())}, or a .csv/.tsv file (.gz too)")
    path = Path(data.name)
    if data.dir is not None and not path.is_absolute():
        path = Path(data.dir) / path
    if path.is_absolute() and not path.exists():  # a run's recorded CSV, moved
        raise DataError(moved_data_message(str(path)))
    return load_csv_table(
        path, target=data.target, features=list(data.features), onehot=data.categorical == "onehot", drop_missing=data.drop_missing
    )


def select_features(table: Table, features: list[str]) -> Table:
    """An embedded table limited to the named features (in the given order)."""
    names = table.schema.columns
    unknown = [name for name in features if name not in names]
    if unknown:
        raise DataError(f"{table.source} has no feature {', '.join(map(repr, unknown))}; features: {', '.join(names)}")
    columns = [names.index(name) for name in features]
    return Table(table.features[:, columns], table.target, Schema(list(features), table.schema.target), table.source)


def load_regression_data(config: Config) -> RegressionData:
    """The run's table, split and standardised as config.data and train.seed say."""
    d = config.data
    return build_regression_data(
        load_table(d), test_fraction=d.test_fraction, val_fraction=d.val_fraction, seed=config.train.seed, standardize=d.standardize
    )


def anchored(config: Config) -> Config:
    """A copy whose CSV path is absolute (data.dir folded in), so evaluate and --resume find the
    file from any working directory."""
    name = config.data.name
    if name in TABLES or not is_csv(name):
        return config
    path = Path(name) if config.data.dir is None or Path(name).is_absolute() else Path(config.data.dir) / name
    data = dataclasses.replace(config.data, name=str(path.resolve()), dir=None)
    return dataclasses.replace(config, data=data)
