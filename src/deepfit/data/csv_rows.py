"""CSV pixel rows (.csv or .csv.gz): one image per row, the label first, then its pixels 0..255;
a header row is optional (where it names a label column elsewhere, that one is the label); the
shape comes from data.image_shape (CxHxW) or a square guess."""

from __future__ import annotations

import gzip
import math
import re
import zlib
from pathlib import Path

import numpy as np
import torch

from deepfit.data.bundle import ImageSet, SourceData
from deepfit.errors import DataError

__all__ = ["load_csv_source", "parse_image_shape", "read_pixel_csv", "require_label_column"]


def parse_image_shape(text: str) -> tuple[int, int, int]:
    """'1x28x28' -> (1, 28, 28); 'HxW' means one channel."""
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) == 2:
        dims = (1, *dims)
    if len(dims) != 3 or min(dims) < 1:
        raise DataError(f"data.image_shape {text!r} is not CxHxW (for example 1x28x28)")
    return dims[0], dims[1], dims[2]


def guess_shape(pixels: int) -> tuple[int, int, int]:
    """A square one-channel image, or a square three-channel one."""
    if pixels < 1:
        raise DataError("rows have a label but no pixel values")
    for channels in (1, 3):
        side = math.isqrt(pixels // channels)
        if pixels % channels == 0 and side * side * channels == pixels:
            return channels, side, side
    raise DataError(f"rows have {pixels} pixel values, not a square image; pass --data.image-shape CxHxW")


def read_lines(path: Path) -> list[bytes]:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    return raw.replace(b"\r\n", b"\n").split(b"\n")


def is_header(line: bytes) -> bool:
    first = line.split(b",", 1)[0].strip().strip(b'"')
    try:
        float(first)
    except ValueError:
        return True
    return False


LABEL_NAMES = ("label", "labels", "class", "target", "y")  # a header's name for the label column, wherever it stands
PIXEL_NAME = re.compile(r"(pixel|pix|p)?_?\d+", re.IGNORECASE)  # pixel0, pixel_12, p3, 7


def label_column(header: bytes) -> int | None:
    """Where a header row puts the label: the column named label (or class, target, y), else the
    first; None when no column is so named and the first is named as a pixel (pixel0): pixels
    only, whose first values were read as labels, 253 classes of them."""
    names = [name.lower() for name in header_names(header)]
    found = [i for i, name in enumerate(names) if name in LABEL_NAMES]
    if found:
        return found[0]
    return None if PIXEL_NAME.fullmatch(names[0]) else 0


def header_names(line: bytes) -> list[str]:
    """A header row's column names, unquoted."""
    return [name.strip().strip('"') for name in line.decode(errors="replace").split(",")]


def no_label_message(path: Path, header: bytes) -> str:
    return (
        f"{path}: the header names no label column and its first column, {header_names(header)[0]}, is a pixel; name the column of"
        f" class numbers label (or {', '.join(LABEL_NAMES[1:])})"
    )


def read_pixel_csv(path: str | Path, *, image_shape: str | None = None, unlabelled_ok: bool = False) -> ImageSet:
    """CSV rows 'label,p0,p1,...' -> ImageSet uint8 (N, C, H, W) + int64 labels; every malformed
    row is reported with its line number (1-based, header included). unlabelled_ok (prediction,
    image_shape given): rows of pixels only are read too, with labels 0."""
    path = Path(path)
    lines = read_lines(path)
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    label_at: int | None = 0
    header = numbered[0][1] if numbered and is_header(numbered[0][1]) else None
    if header is not None:
        label_at = label_column(header)
        numbered = numbered[1:]
    if not numbered:
        raise DataError(f"{path} has no data rows")
    widths = [line.count(b",") + 1 for _, line in numbered]
    width = widths[0] if image_shape is None else math.prod(parse_image_shape(image_shape)) + 1
    labelled = not (unlabelled_ok and image_shape is not None and widths[0] == width - 1)
    if labelled and label_at is None and header is not None:
        raise DataError(no_label_message(path, header))
    width -= 0 if labelled else 1
    wrong = [(n, w) for (n, _), w in zip(numbered, widths, strict=True) if w != width]
    if wrong:
        n, w = wrong[0]
        expected = f"{width} (label + pixels)" if labelled else f"{width} (pixels, no label)"
        if unlabelled_ok and image_shape is not None:  # prediction: the model's shape, with or without a label
            size = math.prod(parse_image_shape(image_shape))
            expected = f"{size} pixels ({image_shape}), or {size + 1} with a label first"
        raise DataError(f"{path} line {n}: {w} values, expected {expected}; {len(wrong)} row(s) like this")
    shape = parse_image_shape(image_shape) if image_shape else guess_shape(width - 1)
    values = parse_values(path, numbered, width)
    if label_at:  # 'pixel0,...,pixel63,label': the label moved to the front, as the rest expects it
        values = np.concatenate([values[:, label_at : label_at + 1], np.delete(values, label_at, axis=1)], axis=1)
    if not labelled:
        values = np.concatenate([np.zeros((len(values), 1)), values], axis=1)
    pixels = values[:, 1:]
    check_range(path, numbered, pixels)
    labels = values[:, 0]
    if np.any(labels < 0) or np.any(labels != np.round(labels)):
        row = int(np.argmax((labels < 0) | (labels != np.round(labels))))
        raise DataError(f"{path} line {numbered[row][0]}: label {labels[row]:g} is not a whole number >= 0")
    images = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, *shape))
    return ImageSet(images, torch.from_numpy(labels.astype(np.int64)))


def parse_values(path: Path, numbered: list[tuple[int, bytes]], width: int) -> np.ndarray:
    """All values as float64 (rows, width); on failure, find the first row that is not numbers."""
    try:
        return np.array(b",".join(line for _, line in numbered).split(b","), dtype=np.float64).reshape(-1, width)
    except ValueError:
        pass
    for n, line in numbered:
        for value in line.split(b","):
            try:
                float(value)
            except ValueError:
                raise DataError(f"{path} line {n}: {value.decode(errors='replace').strip()!r} is not a number") from None
    raise DataError(f"{path}: cannot parse the rows as numbers")


def check_range(path: Path, numbered: list[tuple[int, bytes]], pixels: np.ndarray) -> None:
    bad = (pixels < 0) | (pixels > 255) | (pixels != np.round(pixels)) | ~np.isfinite(pixels)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{path} line {numbered[row][0]}: pixel {col + 1} = {pixels[row, col]:g} is not a whole number in 0-255")


def load_csv_source(path: Path, *, image_shape: str | None) -> SourceData:
    """A CSV as a training set (a seeded validation split is taken later); a sibling file whose
    name says test (train.csv -> test.csv) becomes the test split."""
    try:
        train = read_pixel_csv(path, image_shape=image_shape)
    except DataError as err:
        raise DataError(f"{err}{table_hint(path)}") from None
    test_path = sibling_test(path)
    test = read_pixel_csv(test_path, image_shape=image_shape) if test_path else None
    top = int(train.labels.max()) if test is None else int(max(train.labels.max(), test.labels.max()))
    classes = [str(i) for i in range(top + 1)]
    origin = str(path) + (f" (test: {test_path})" if test_path else "")
    return SourceData(train=train, test=test, classes=classes, flip_ok=False, origin=origin)


def require_label_column(path: Path, train: ImageSet) -> None:
    """Labels that cannot be a label column's (more classes than rows, or one value in every row)
    are a file whose label stands elsewhere, read from its first pixel: said, not trained."""
    values = train.labels.unique()
    top, rows = int(values.max()), len(train.labels)
    if top + 1 > rows or len(values) == 1:
        found = f"runs 0..{top} ({top + 1} classes) over {rows} rows" if len(values) > 1 else f"is {top} in every row"
        raise DataError(
            f"{path}: the first column, read as the label, {found}; is the label in another column? Put it first, or"
            " give the file a header that names it label"
        )


def table_hint(path: Path) -> str:
    """For a CSV whose header does not start with `label` (so not pixel rows): how to train on it
    as a table instead."""
    first = next((line for line in read_lines(path) if line.strip()), b"")
    columns = header_names(first)
    if not is_header(first) or columns[0].lower() in LABEL_NAMES or PIXEL_NAME.fullmatch(columns[0]):  # pixel rows, named
        return ""
    shown = ", ".join(columns[:8]) + (", ..." if len(columns) > 8 else "")
    return f"; {path.name} was read as image rows (a label, then pixels 0-255): for a table, name the column to predict with --target COLUMN (columns: {shown})"


def sibling_test(path: Path) -> Path | None:
    if "train" not in path.name:
        return None
    candidate = path.with_name(path.name.replace("train", "test"))
    return candidate if candidate.is_file() else None
