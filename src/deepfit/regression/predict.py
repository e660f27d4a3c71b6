"""`deepfit predict` for regression checkpoints: CSV rows in, one predicted value per row out,
keeping an id column when asked. A row that cannot be encoded (a missing value, an unknown
category) is reported on its own and the others are still predicted."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from deepfit.errors import DataError
from deepfit.regression.table import MissingValue, read_csv_rows
from deepfit.regression.trained import RegressionModel


@dataclass
class RowFailure:
    path: str
    line: int  # line number in the file (the header is line 1)
    reason: str


@dataclass
class RowPredictions:
    target: str  # the predicted column's name
    id_column: str | None
    ids: list[str] = field(default_factory=list)  # the id column's values, or "FILE:LINE" without one
    values: list[float] = field(default_factory=list)  # in the target's units
    failures: list[RowFailure] = field(default_factory=list)

    def rows(self) -> list[list[str]]:
        """The output table with its header: [id, target] per row."""
        header = [self.id_column or "row", self.target]
        return [header, *([key, f"{value:.6g}"] for key, value in zip(self.ids, self.values, strict=True))]


def predict_csv(trained: RegressionModel, paths: list[str], *, id_column: str | None = None) -> RowPredictions:
    """Predict every data row of the CSV files `paths` (their header names the columns)."""
    result = RowPredictions(trained.target, id_column)
    features: list[list[float]] = []
    for name in paths:
        try:
            header, rows = read_csv_rows(Path(name))
        except DataError as err:  # an image, say, given to a regression run: what it reads instead
            raise DataError(
                f"{err}; this run predicts {trained.target} from CSV rows with the columns {', '.join(trained.schema.columns)}"
            ) from None
        check_columns(header, trained, id_column, name)
        for line, row in enumerate(rows, start=2):
            record = dict(zip(header, row, strict=True))
            try:
                features.append(trained.schema.encode(record))
            except (MissingValue, ValueError) as err:
                result.failures.append(RowFailure(name, line, str(err)))
                continue
            result.ids.append(record[id_column] if id_column else f"{name}:{line}")
    if features:
        result.values = trained.predict(torch.tensor(features, dtype=torch.float64)).tolist()
    return result


def check_columns(header: list[str], trained: RegressionModel, id_column: str | None, name: str) -> None:
    absent = [c for c in trained.schema.columns if c not in header]
    if absent:
        raise DataError(f"{name}: lacks the feature column(s) {', '.join(absent)} this model needs")
    if id_column is not None and id_column not in header:
        raise DataError(f"{name}: no --id-column {id_column!r}; columns: {', '.join(header)}")
