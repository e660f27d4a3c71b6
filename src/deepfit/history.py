"""Per-epoch metric rows: kept in memory, rewritten to metrics.csv atomically, shown as one line."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")

Row = dict[str, float]


def write_metrics_csv(rows: list[Row], path: Path) -> None:
    """The whole table, replaced atomically, so a killed run never leaves a half-written CSV."""
    extra = sorted({key for row in rows for key in row} - set(COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *extra], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: format_value(key, value) for key, value in row.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


def format_value(key: str, value: float) -> str:
    if key == "epoch":
        return str(int(value))
    if isinstance(value, float) and math.isnan(value):
        return ""
    return f"{value:.6g}"


def read_metrics_csv(path: Path) -> list[Row]:
    with path.open(newline="") as handle:
        return [{key: float(value) if value != "" else math.nan for key, value in row.items()} for row in csv.DictReader(handle)]


def format_epoch(row: Row, epochs: int) -> str:
    """'epoch 3/10  train_loss 0.3121 train_acc 88.52%  val_loss ... lr 1.0e-03  4.1s'"""
    parts = [f"epoch {int(row['epoch'])}/{epochs}"]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        value = row.get(key, math.nan)
        if math.isnan(value):
            continue
        parts.append(f"{key} {value:.2%}" if key.endswith("acc") else f"{key} {value:.4f}")
    parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)
