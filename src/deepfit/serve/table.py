"""Serving a regression run: table rows in, one predicted value per row out, encoded by the
checkpoint's own Schema exactly as `deepfit predict RUN rows.csv` encodes a file. Rows arrive as
JSON `{"rows": [{"column": value, ...}, ...]}` or as a CSV body with its header; a row that cannot
be encoded (a missing value, an unknown category, text in a number column) fails the request,
named by its position. A linear model or small MLP on a few thousand rows takes well under a
millisecond, so rows are predicted in the request, with no batcher."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepfit.csvtext import csv_lines
from deepfit.regression.table import MissingValue
from deepfit.regression.trained import RegressionModel, load_regression_model
from deepfit.serve.model import final_metrics, number
from deepfit.serve.uploads import ApiError, media_type
from deepfit.trained import run_folder

CSV_TYPES = ("text/csv", "application/csv", "text/plain")
ROWS_HINT = 'send JSON {"rows": [{"column": value, ...}, ...]} or a CSV body (Content-Type: text/csv) with a header row'


@dataclass
class ServedTable:
    regression: RegressionModel
    info: dict[str, Any] = field(default_factory=dict)  # what GET /v1/model returns
    backend: str = "torch"

    @property
    def target(self) -> str:
        return self.regression.target

    def predict(self, rows: list[dict[str, Any]]) -> list[float]:
        """Rows of cells (column -> text, number or null) -> predicted values in the target's units."""
        encode = self.regression.schema.encode
        try:
            features = [encode(row) for row in rows]
        except (MissingValue, ValueError) as err:
            raise ApiError(400, self.row_error(rows, err)) from None
        return [float(v) for v in self.regression.predict(torch.tensor(features, dtype=torch.float64)).tolist()]

    def row_error(self, rows: list[dict[str, Any]], err: Exception) -> str:
        """The first row that cannot be encoded, named by its position (found again: only on failure)."""
        index = next(i for i, row in enumerate(rows) if not self.encodes(row))
        prefix = f"row {index}: " if len(rows) > 1 else ""
        needed = self.regression.schema.columns
        if absent := [column for column in needed if column not in rows[index]]:
            return f"{prefix}no column {', '.join(map(repr, absent))}; the model needs {', '.join(needed)}"
        return prefix + str(err)

    def encodes(self, row: dict[str, Any]) -> bool:
        try:
            self.regression.schema.encode(row)
        except (MissingValue, ValueError):
            return False
        return True


def load_served_table(path: str | Path) -> ServedTable:
    """A regression run folder or checkpoint, ready to answer; CheckpointError when unusable."""
    given = Path(path)
    regression = load_regression_model(given)
    served = ServedTable(regression)
    schema = regression.schema
    run_dir = run_folder(given) or run_folder(regression.path)
    served.info = {
        "task": "regression",
        "target": schema.target,
        "features": list(schema.columns),
        "categories": {column: list(levels) for column, levels in schema.categories.items()},
        "architecture": regression.config.model.name,
        "checkpoint": regression.path.name,
        "run": (run_dir or given).name,
        "backend": served.backend,
        "metrics": table_metrics(run_dir),
    }
    return served


def table_metrics(run_dir: Path | None) -> dict[str, float]:
    """The last row of metrics.csv without the image columns a regression run leaves empty, and
    the scores of report.json (evaluate_r2, ...) when `deepfit evaluate` wrote one."""
    metrics = {key: value for key, value in final_metrics(run_dir).items() if value is not None}
    try:
        report = json.loads((run_dir / "report.json").read_text()) if run_dir is not None else {}
    except (OSError, ValueError):
        report = {}
    if isinstance(report, dict) and report.get("task") == "regression":
        for key in ("mse", "rmse", "mae", "r2"):
            if (value := number(report.get(key))) is not None:
                metrics[f"evaluate_{key}"] = value
    return metrics


def parse_rows(content_type: str | None, body: bytes, max_rows: int) -> list[dict[str, Any]]:
    """The rows of a request, cells by column name (text, or JSON numbers and nulls); ApiError for
    anything malformed."""
    kind = media_type(content_type)
    if kind == "application/json":
        rows = json_rows(body)
    elif kind in CSV_TYPES:
        rows = csv_rows(body)
    else:
        raise ApiError(415, f"unsupported Content-Type {(kind or 'none')[:80]!r}: {ROWS_HINT}")
    if not rows:
        raise ApiError(400, f"no rows: {ROWS_HINT}")
    if len(rows) > max_rows:
        raise ApiError(413, f"{len(rows)} rows in one request; the limit is {max_rows}")
    return rows


def json_rows(body: bytes) -> list[dict[str, Any]]:
    """The rows of a JSON body as they are: their cells are checked as the model's columns are read."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, f"the body is not valid JSON: {ROWS_HINT}") from None
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if not isinstance(rows, list):
        images = (
            '; "images" are for an image classifier, and this run predicts from table rows'
            if isinstance(payload, dict) and "images" in payload
            else ""
        )
        raise ApiError(400, f'JSON without a "rows" list: {ROWS_HINT}{images}')
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ApiError(400, f"row {index} is not an object of column: value")
    return rows


def csv_rows(body: bytes) -> list[dict[str, Any]]:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "the CSV body is not UTF-8 text") from None
    header: list[str] | None = None
    rows = []
    try:
        for number, row in csv_lines(text):
            if header is None:
                header = [name.strip() for name in row]
            elif len(row) != len(header):
                raise ApiError(400, f"CSV line {number}: {len(row)} cells, the header has {len(header)}")
            else:
                rows.append(dict(zip(header, row, strict=True)))
    except csv.Error as err:
        raise ApiError(400, f"the CSV body cannot be read: {err}") from None
    return rows
