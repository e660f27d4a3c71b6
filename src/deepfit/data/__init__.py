"""Datasets: the DATASETS registry of named sources and build_data() -> DataBundle."""

from __future__ import annotations

from collections.abc import Callable

from deepfit.config import DataConfig
from deepfit.data.bundle import DataBundle, ImageSet, SourceData, channel_stats, split_validation
from deepfit.data.loader import AUGMENT_PRESETS, BatchLoader
from deepfit.data.sources import load_digits_source, load_idx_source
from deepfit.registry import Registry

__all__ = [
    "AUGMENT_PRESETS",
    "DATASETS",
    "BatchLoader",
    "DataBundle",
    "ImageSet",
    "SourceData",
    "build_data",
    "list_datasets",
    "load_source",
]

SourceBuilder = Callable[[DataConfig, int], SourceData]
DATASETS: Registry[SourceBuilder] = Registry("dataset")


@DATASETS.register("digits")
def _digits(config: DataConfig, seed: int) -> SourceData:
    return load_digits_source()


@DATASETS.register("mnist")
def _mnist(config: DataConfig, seed: int) -> SourceData:
    return load_idx_source("mnist", data_dir=config.dir, download=config.download)


@DATASETS.register("fashion-mnist")
def _fashion_mnist(config: DataConfig, seed: int) -> SourceData:
    return load_idx_source("fashion-mnist", data_dir=config.dir, download=config.download)


def list_datasets() -> list[str]:
    return DATASETS.names()


def load_source(config: DataConfig, *, seed: int) -> SourceData:
    """Decode the source named by `config.name` (a registered dataset) into memory."""
    return DATASETS.get(config.name)(config, seed)


def build_data(config: DataConfig, *, seed: int = 0) -> DataBundle:
    """Load a source, hold out a seeded validation split and measure normalisation stats."""
    source = load_source(config, seed=seed)
    train, val = source.train, source.val
    if val is None:
        train, val = split_validation(source.train, config.val_fraction, seed)
    mean, std = channel_stats(train.images)
    return DataBundle(
        train=train,
        val=val,
        test=source.test,
        classes=source.classes,
        mean=mean,
        std=std,
        flip_ok=source.flip_ok,
        source=config.name,
        origin=source.origin,
        skipped=source.skipped,
    )
