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


LR_FILE = "lr.csv"  # the learning rate after every training batch: step, epoch (fractional), lr

LrPoint = tuple[float, float]  # (epoch as a fraction: 2.5 = half way through epoch 3, learning rate)


def early_stop_reason(key: str, epoch: int, best_epoch: int, patience: int) -> str | None:
    """Why a run stops early ('no val_acc improvement for 3 epochs') once `patience` epochs have
    passed since `best_epoch` without a better `key`; None before that, and always when patience is 0."""
    if not patience or epoch - best_epoch < patience:
        return None
    return f"no {key} improvement for {plural(patience, 'epoch')}"


def plural(count: int, word: str) -> str:
    """'1 epoch', '3 epochs'."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def write_lr_csv(points: list[LrPoint], path: Path) -> None:
    """One row per training batch, so the lr panel follows a schedule within epochs; replaced atomically."""
    lines = ["step,epoch,lr", *(f"{step},{epoch:.6g},{lr:.6g}" for step, (epoch, lr) in enumerate(points, start=1))]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def read_lr_csv(path: Path) -> list[LrPoint]:
    """The (fractional epoch, lr) points of lr.csv; [] when the run has none (runs from before it)."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [(float(row["epoch"]), float(row["lr"])) for row in csv.DictReader(handle)]
