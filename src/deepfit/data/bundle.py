"""The in-memory dataset types: decoded uint8 images with labels, split and described."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deepfit.errors import DataError


@dataclass
class ImageSet:
    """Decoded images (N, C, H, W) uint8 and their labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class SourceData:
    """What a data source yields before validation splitting and statistics."""

    train: ImageSet
    test: ImageSet | None
    classes: list[str]
    flip_ok: bool  # a mirror image keeps its class (not for digits)
    origin: str  # where the data was found, for people
    val: ImageSet | None = None  # a source's own validation split, when it has one
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of bad files


@dataclass
class DataBundle:
    """Train/val/test splits plus everything needed to preprocess new images like the training ones."""

    train: ImageSet
    val: ImageSet | None
    test: ImageSet | None
    classes: list[str]
    mean: tuple[float, ...]  # per-channel mean of the training split, pixels scaled to 0..1
    std: tuple[float, ...]  # per-channel standard deviation, same scale
    flip_ok: bool
    source: str  # the --data value
    origin: str  # where it was found
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_validation(train: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """A seeded stratified split: `fraction` of each class goes to validation."""
    if fraction <= 0:
        return train, None
    generator = torch.Generator().manual_seed(seed)
    val_parts = []
    for label in torch.unique(train.labels):
        members = torch.nonzero(train.labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        val_parts.append(members[: round(len(members) * fraction)])
    val_index = torch.cat(val_parts).sort().values
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_index] = False
    if not keep.any() or len(val_index) == 0:
        raise DataError(f"the training split ({len(train)} images) is too small for a {fraction:.0%} validation split")
    return train.subset(torch.nonzero(keep).flatten()), train.subset(val_index)


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), on the 0..1 scale, in float64 chunks."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].to(torch.float64).div_(255)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(float(m) for m in mean), tuple(max(float(s), 1e-3) for s in std)
