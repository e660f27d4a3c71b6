"""Datasets: the DATASETS registry of named sources, paths to folders/zips/CSVs, and
build_data() -> DataBundle."""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from deepfit.config import DataConfig
from deepfit.data.bundle import DataBundle, ImageSet, SourceData, channel_stats, conform, require_classes, split_validation
from deepfit.data.decode import MAX_PIXELS
from deepfit.data.loader import AUGMENT_PRESETS, BatchLoader, StreamLoader, build_loader
from deepfit.data.paths import is_data_path, load_cifar10, load_idx_cached, load_path_source
from deepfit.data.sources import load_digits_source
from deepfit.data.stream import StreamSet, load_images, pipeline_source, settle, stats_images
from deepfit.data.user_dataset import dataset_source
from deepfit.errors import DataError, did_you_mean, moved_data_message
from deepfit.registry import Registry

__all__ = [
    "AUGMENT_PRESETS",
    "DATASETS",
    "BatchLoader",
    "DataBundle",
    "ImageSet",
    "SourceData",
    "StreamLoader",
    "StreamSet",
    "anchor_paths",
    "build_data",
    "build_loader",
    "list_datasets",
    "load_images",
    "load_source",
    "refuse_run_in_folder",
    "require_classes",
]

SourceBuilder = Callable[[DataConfig, int], SourceData]
DATASETS: Registry[SourceBuilder] = Registry("dataset")


@DATASETS.register("digits")
def _digits(config: DataConfig, seed: int) -> SourceData:
    if config.dir is not None:  # e.g. a recipe run without its data.name or --data: say so, not train on digits quietly
        warnings.warn(f"data.dir {config.dir} is not read: the dataset is digits, embedded in scikit-learn", stacklevel=2)
    return load_digits_source()


@DATASETS.register("mnist")
def _mnist(config: DataConfig, seed: int) -> SourceData:
    return load_idx_cached("mnist", config)


@DATASETS.register("fashion-mnist")
def _fashion_mnist(config: DataConfig, seed: int) -> SourceData:
    return load_idx_cached("fashion-mnist", config)


@DATASETS.register("cifar10")
def _cifar10(config: DataConfig, seed: int) -> SourceData:
    return load_cifar10(config)


def list_datasets() -> list[str]:
    return DATASETS.names()


def load_source(config: DataConfig, *, seed: int) -> SourceData:
    """Decode `config.name` into memory: a registered dataset, or a path to an image folder,
    a .zip of one, or a .csv/.csv.gz of pixel rows."""
    if config.name in DATASETS:
        return DATASETS.get(config.name)(config, seed)
    path = Path(config.name).expanduser()
    if is_data_path(path):
        return load_path_source(path, config)
    raise DataError(unknown_source_message(config.name, path))


def anchor_paths(config: DataConfig) -> None:
    """Make a source path and data.dir absolute, so the saved config finds them from any folder."""
    path = Path(config.name).expanduser()
    if config.name not in DATASETS and is_data_path(path):
        config.name = str(path.resolve())
    if config.dir is not None:
        config.dir = str(Path(config.dir).expanduser().resolve())


def refuse_run_in_folder(config: DataConfig, out: Path) -> None:
    """--out (or runs/, where it is not given) inside the image folder being trained on: refused
    before anything is written there, as the folder would read the run's plots as images of a
    class (paths.refuse_runs_inside)."""
    folder = Path(config.name).expanduser()
    if config.name not in DATASETS and folder.is_dir() and out.resolve().is_relative_to(folder.resolve()):
        raise DataError(
            f"the run would be written in {out}, inside the image folder {folder} it trains on, which would then read"
            " its plots as images of a class: give an --out outside that folder"
        )


OWN_DATASET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.<>]*")  # fit(data=Flowers()) records mypkg.data:Flowers


def unknown_source_message(name: str, path: Path) -> str:
    names = ", ".join(list_datasets())
    if path.exists():
        return f"--data {name} is neither a folder nor a .zip, .csv or .csv.gz file; registered datasets: {names}"
    if path.is_absolute():  # how a run records its data: a folder or file that was there
        return moved_data_message(name)
    if OWN_DATASET.fullmatch(name):  # how a run records a Dataset of yours: module:Class
        return (
            f"this run trained on your own Dataset {name}, which deepfit does not rebuild from its name: give --data"
            " PATH (a folder, .zip or .csv of images of the run's classes)"
        )
    hint = did_you_mean(name, list_datasets())
    return f"unknown dataset {name!r}{hint}: not a registered name ({names}) nor an existing folder, .zip, .csv or .csv.gz"


def check_settings(config: DataConfig) -> None:
    if config.channels not in (None, 1, 3):
        raise DataError(f"data.channels must be 1 or 3; got {config.channels}")
    if config.image_size is not None and config.image_size < 1:
        raise DataError(f"data.image_size must be a positive number of pixels; got {config.image_size}")
    if config.image_size is not None and config.image_size**2 > MAX_PIXELS:  # the bound image files are held to
        most = math.isqrt(MAX_PIXELS)
        raise DataError(f"data.image_size {config.image_size} is over the decoded-image limit of {MAX_PIXELS} pixels: at most {most}")


def build_data(config: DataConfig | str | os.PathLike[str], *, seed: int = 0, dataset: Dataset[Any] | None = None) -> DataBundle:
    """Load a source, fit it to the asked channels/size, hold out a seeded validation split
    and measure normalisation stats on the training split. `config`: a DataConfig, or a source's
    name or path with the defaults (build_data("digits")). `dataset`: a user's Dataset of
    (image, label) instead of config.name. data.pipeline decides memory or streaming (stream.py)."""
    config = DataConfig(name=os.fspath(config)) if isinstance(config, (str, os.PathLike)) else config
    check_settings(config)

    def load() -> SourceData:
        return conform(load_source(config, seed=seed), channels=config.channels, image_size=config.image_size)

    if dataset is not None:
        source = dataset_source(dataset, config)
    else:
        source = pipeline_source(config, registered=config.name in DATASETS, load=load)
    train, val = source.train, source.val
    if val is None:
        train, val = split_validation(source.train, config.val_fraction, seed)
    mean, std = channel_stats(stats_images(train, seed=seed, num_workers=config.num_workers, skip_bad=config.skip_bad))
    return DataBundle(
        train=train,
        val=settle(val, config),
        test=settle(source.test, config),
        classes=source.classes,
        mean=mean,
        std=std,
        flip_ok=source.flip_ok,
        source=config.name if dataset is None else type(dataset).__name__,
        origin=source.origin,
        skipped=source.skipped,
        sizes=source.sizes,
    )
