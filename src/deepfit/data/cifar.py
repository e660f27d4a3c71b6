"""CIFAR-10 in torchvision's python format (cifar-10-batches-py/) from a local folder, or
downloaded by torchvision when asked."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfit.data.bundle import ImageSet, SourceData
from deepfit.data.sources import DATASETS_ENV, SYSTEM_DIR
from deepfit.errors import DataError

BATCHES = "cifar-10-batches-py"  # torchvision's folder name under its root
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def candidate_folders(data_dir: str | None) -> list[Path]:
    """--data-dir (itself or its cifar-10-batches-py), $DEEPFIT_DATASETS/cifar10, /usr/share/datasets/cifar10."""
    roots = [Path(data_dir)] if data_dir else []
    if not data_dir and os.environ.get(DATASETS_ENV):
        roots.append(Path(os.environ[DATASETS_ENV]) / "cifar10")
    if not data_dir:
        roots.append(SYSTEM_DIR / "cifar10")
    return [folder for root in roots for folder in (root, root / BATCHES)]


def find_cifar_folder(data_dir: str | None) -> Path | None:
    for folder in candidate_folders(data_dir):
        if (folder / TEST_FILE).is_file():
            return folder
    return None


def download_cifar(data_dir: str | None) -> Path:
    from torchvision import datasets

    from deepfit.runtime import default_cache_dir

    root = Path(data_dir) if data_dir else Path(default_cache_dir()) / "datasets"
    try:
        datasets.CIFAR10(str(root), train=True, download=True)
    except (OSError, RuntimeError) as err:
        raise DataError(f"downloading cifar10 failed: {err}") from None
    return root / BATCHES


def locate_cifar(data_dir: str | None, download: bool) -> Path:
    folder = find_cifar_folder(data_dir)
    if folder is None and download:
        folder = download_cifar(data_dir)
    if folder is None:
        places = ", ".join(str(p) for p in candidate_folders(data_dir))
        raise DataError(f"cifar10 ({BATCHES}/) not found (looked in {places}); pass --data-dir DIR or add --download")
    return folder


def read_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """One pickled batch: 'data' (N, 3072) uint8 rows in CHW order, 'labels' (N,)."""
    try:
        with path.open("rb") as handle:
            entry: Any = pickle.load(handle, encoding="latin1")  # the format is a pickle, as in torchvision
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = list(entry.get("labels", entry.get("fine_labels", [])))
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{path} is not a CIFAR batch file ({type(err).__name__}: {err})") from None
    if len(labels) != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {len(labels)} labels")
    return data, labels


def read_split(folder: Path, names: list[str]) -> ImageSet:
    parts = [read_batch(folder / name) for name in names]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.tensor([label for p in parts for label in p[1]], dtype=torch.int64)
    return ImageSet(images, labels)


def load_cifar_source(folder: Path) -> SourceData:
    """Train (5 batches) and test batch of a cifar-10-batches-py folder."""
    missing = [n for n in [*TRAIN_FILES, TEST_FILE] if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} is missing {', '.join(missing)}")
    train, test = read_split(folder, TRAIN_FILES), read_split(folder, [TEST_FILE])
    for split in (train, test):
        if len(split) and (split.labels.min() < 0 or split.labels.max() >= len(CLASSES)):
            raise DataError(f"{folder}: labels must be in 0..{len(CLASSES) - 1}")
    return SourceData(train=train, test=test, classes=list(CLASSES), flip_ok=True, origin=str(folder))
