"""Regression tables: a CSV (or CSV.gz) with a header row, or an embedded dataset, read into
float feature rows and a numeric target. The Schema says how a row of text becomes features,
so training, evaluate and predict encode rows the same way (it is saved in the checkpoint)."""

from __future__ import annotations

import csv
import gzip
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepfit.csvtext import csv_lines
from deepfit.errors import DataError, did_you_mean
from deepfit.history import plural

MISSING = {"", "na", "nan", "n/a", "null", "none", "?"}  # cells read as "no value" (case-insensitive)
MAX_LEVELS = 100  # a text column with more distinct values is an id or free text, not a category


class MissingValue(ValueError):
    """A row has no value (or a non-finite one) in a column it needs."""

    def __init__(self, column: str) -> None:
        super().__init__(f"missing value in column {column!r}")
        self.column = column


@dataclass(frozen=True)
class Schema:
    """How a CSV row becomes a feature vector: numeric columns as they are, one-hot columns as one
    0/1 feature per level (in the order of `levels`)."""

    columns: list[str]  # the feature columns of the file, in order
    target: str  # the column to predict
    categories: dict[str, list[str]] = field(default_factory=dict)  # one-hot column -> its levels

    def feature_names(self) -> list[str]:
        names: list[str] = []
        for column in self.columns:
            levels = self.categories.get(column)
            names += [f"{column}={level}" for level in levels] if levels is not None else [column]
        return names

    def encode(self, row: Mapping[str, object]) -> list[float]:
        """One row's features from its cells: text as a CSV holds it, or the numbers and nulls of a
        JSON row; MissingValue or ValueError (an unknown level, a non-number) when it cannot."""
        values: list[float] = []
        for column in self.columns:
            cell = row.get(column)
            levels = self.categories.get(column)
            if levels is None and type(cell) in (int, float):  # a JSON number: no round trip through text
                values.append(finite(as_float(cell, column), column))
                continue
            text = cell_text(cell, column)
            if text.lower() in MISSING:
                raise MissingValue(column)
            if levels is None:
                values.append(parse_number(text, column))
            elif text in levels:
                values += [1.0 if text == level else 0.0 for level in levels]
            else:
                raise ValueError(f"column {column!r} has {text!r}, a value not seen in training (known: {', '.join(levels[:10])})")
        return values

    def to_dict(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "target": self.target, "categories": {k: list(v) for k, v in self.categories.items()}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Schema:
        return cls(
            [str(c) for c in raw["columns"]], str(raw["target"]), {str(k): [str(x) for x in v] for k, v in raw["categories"].items()}
        )


def cell_text(cell: object, column: str) -> str:
    """A cell as text: a CSV's as it is, a JSON number as written, null (or no cell) as missing."""
    if cell is None:
        return ""
    if isinstance(cell, str):
        return cell.strip()
    if type(cell) in (int, float):
        return str(cell)
    raise ValueError(f"column {column!r} holds {str(cell)[:40]}, not a number or text")


def parse_number(cell: str, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise ValueError(f"column {column!r} has {cell!r}, not a number") from None
    return finite(value, column)


def as_float(cell: object, column: str) -> float:
    """A JSON number as a float; an integer beyond float's range (JSON allows any) is refused."""
    try:
        return float(cell)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueError(f"column {column!r} holds a number too large for a float") from None


def finite(value: float, column: str) -> float:
    if not math.isfinite(value):
        raise MissingValue(column)
    return value


@dataclass
class Table:
    """Rows of features (N, F) and targets (N,), in the file's units, plus what reading left out."""

    features: np.ndarray  # (N, F) float64
    target: np.ndarray  # (N,) float64
    schema: Schema
    source: str  # the dataset name or file path
    ignored: list[str] = field(default_factory=list)  # text columns left out (data.categorical ignore)
    strays: dict[str, str] = field(default_factory=dict)  # ignored columns that are mostly numbers: their first text cell
    dropped_rows: int = 0  # rows with a missing value dropped (data.drop_missing)

    @property
    def feature_names(self) -> list[str]:
        return self.schema.feature_names()


def read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and the data rows of a .csv or .csv.gz (comma-, semicolon- or tab-separated:
    csvtext); DataError for anything unreadable."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.name.endswith(".gz") else raw).decode("utf-8-sig")
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot read it: {err}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 text CSV file") from None
    try:
        lines = list(csv_lines(text))
    except csv.Error as err:
        raise DataError(f"{path} is not a valid CSV file: {err}") from None
    if len(lines) < 2:
        raise DataError(f"{path}: needs a header row and at least one data row")
    header = [name.strip() for name in lines[0][1]]
    for number, row in lines[1:]:
        if len(row) != len(header):
            raise DataError(f"{path}: line {number} has {len(row)} fields, the header {len(header)}")
    return header, [row for _, row in lines[1:]]


def numeric_columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> set[str]:
    """Columns whose every present value parses as a number (all-missing columns count as numeric)."""
    return {name for i, name in enumerate(header) if all(is_number(cell) for _, cell in present_cells(rows, i))}


def present_cells(rows: Sequence[Sequence[str]], index: int) -> Iterator[tuple[int, str]]:
    """(data row number from 1, cell) for the column's cells that hold a value (stripped; NA-like ones left out), lazily."""
    numbered = enumerate((row[index].strip() for row in rows), start=1)
    return ((number, cell) for number, cell in numbered if cell.lower() not in MISSING)


def stray_text(header: list[str], rows: list[list[str]], names: list[str]) -> dict[str, str]:
    """For each named column whose present cells are mostly numbers, where its text is: "'x' in data
    row 7" (and how many more), so a stray cell is not mistaken for a text column."""
    strays = {}
    for name in names:
        present = list(present_cells(rows, header.index(name)))
        text = [(number, cell) for number, cell in present if not is_number(cell)]
        if text and 2 * len(text) < len(present):
            number, cell = text[0]
            strays[name] = f"{cell!r} in data row {number}" + (f" and {plural(len(text) - 1, 'more cell')}" if len(text) > 1 else "")
    return strays


def is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def choose_schema(
    header: list[str], rows: list[list[str]], *, target: str, features: list[str], onehot: bool, path: Path
) -> tuple[Schema, list[str]]:
    """The feature columns (given, or every other column) and one-hot levels; text columns left out are returned."""
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise DataError(f"{path}: column names appear twice: {', '.join(duplicated)}")
    unknown = [name for name in [target, *features] if name not in header]
    if unknown:
        hint = did_you_mean(unknown[0], header) if len(unknown) == 1 else ""
        raise DataError(f"{path}: no column {', '.join(map(repr, unknown))}{hint}; columns: {', '.join(header)}")
    if target in features:  # the answer given as an input: R^2 1.0, and a model that predicts nothing
        raise DataError(f"{path}: {target!r} is the target; it cannot be one of the --features too")
    repeated = sorted({name for name in features if features.count(name) > 1})
    if repeated:
        raise DataError(f"{path}: --features names {', '.join(map(repr, repeated))} more than once")
    numeric = numeric_columns(header, rows)
    if target not in numeric:
        number, cell = next((n, c) for n, c in present_cells(rows, header.index(target)) if not is_number(c))
        raise DataError(
            f"{path}: the target column {target!r} is not numeric ({cell!r} in data row {number}); regression predicts a number"
        )
    wanted = features or [name for name in header if name != target]
    text = [name for name in wanted if name not in numeric]
    if text and features and not onehot:
        raise DataError(f"{path}: feature column(s) {', '.join(text)} hold text; use --data.categorical onehot or leave them out")
    categories = {name: levels_of(rows, header.index(name), name, path) for name in text} if onehot else {}
    columns = [name for name in wanted if name in numeric or name in categories]
    if not columns:
        raise DataError(
            f"{path}: no numeric feature columns besides {target!r} (text columns: {', '.join(text)}; try --data.categorical onehot)"
        )
    return Schema(columns, target, categories), [] if onehot else text


def levels_of(rows: list[list[str]], index: int, name: str, path: Path) -> list[str]:
    levels = sorted({row[index].strip() for row in rows if row[index].strip().lower() not in MISSING})
    if len(levels) > MAX_LEVELS:
        raise DataError(
            f"{path}: text column {name!r} has {len(levels)} distinct values (> {MAX_LEVELS}), too many to one-hot; leave it out with --features"
        )
    return levels


def is_missing(cell: str) -> bool:
    """An empty or NA-like cell, or a non-finite number (nan, inf)."""
    text = cell.strip()
    if text.lower() in MISSING:
        return True
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def missing_counts(header: list[str], rows: list[list[str]], used: list[str]) -> tuple[dict[str, int], list[bool]]:
    """Rows without a value, per used column, and which rows lack any."""
    indices = {name: header.index(name) for name in used}
    counts = {name: sum(is_missing(row[i]) for row in rows) for name, i in indices.items()}
    gaps = [any(is_missing(row[i]) for i in indices.values()) for row in rows]
    return {name: n for name, n in counts.items() if n}, gaps


def encode_rows(
    schema: Schema, header: list[str], rows: list[list[str]], *, drop_missing: bool, path: Path
) -> tuple[np.ndarray, np.ndarray, int]:
    """Features (N, F), targets (N,) and the number of rows dropped. Missing values are an error
    naming each column and its row count, unless drop_missing drops those rows."""
    counts, gaps = missing_counts(header, rows, [*schema.columns, schema.target])
    dropped = sum(gaps)
    if counts and not drop_missing:
        detail = ", ".join(f"{name} ({plural(n, 'row')})" for name, n in counts.items())
        raise DataError(
            f"{path}: {plural(dropped, 'row')} of {len(rows)} have missing values: {detail}; drop them with --data.drop-missing true"
        )
    kept = [(n, dict(zip(header, row, strict=True))) for n, (row, gap) in enumerate(zip(rows, gaps, strict=True), start=1) if not gap]
    if not kept:
        raise DataError(f"{path}: every row has a missing value; nothing is left to train on")
    features, targets = [], []
    for number, record in kept:
        try:
            features.append(schema.encode(record))
            targets.append(parse_number(record[schema.target].strip(), schema.target))
        except ValueError as err:  # an unseen category, text in a number column
            raise DataError(f"{path} data row {number}: {err}") from None
    return np.asarray(features, dtype=np.float64), np.asarray(targets, dtype=np.float64), dropped


def load_csv_table(path: Path, *, target: str | None, features: list[str], onehot: bool, drop_missing: bool) -> Table:
    """A CSV file as a Table: --target names the column to predict, --features the inputs."""
    if not target:
        raise DataError(f"{path}: name the column to predict with --target COLUMN")
    header, rows = read_csv_rows(path)
    schema, ignored = choose_schema(header, rows, target=target, features=features, onehot=onehot, path=path)
    x, y, dropped = encode_rows(schema, header, rows, drop_missing=drop_missing, path=path)
    return Table(x, y, schema, str(path), ignored, stray_text(header, rows, ignored), dropped)
