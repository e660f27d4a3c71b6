"""A user's own torch Dataset of (image, label) as a deepfit source: PIL images, (C, H, W)
tensors or (H, W, C) numpy arrays (uint8, or float in 0..1) converted to uint8, classes from `.classes` or the labels,
decoded into memory when it fits data.memory_budget_mb, else streamed through the workers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from deepfit.config import DataConfig
from deepfit.data.bundle import ImageSet, SourceData, conform_chunk
from deepfit.data.decode import GREY_MODES, eight_bit, resize
from deepfit.data.stream import CHUNK, WORKERS_FROM, Item, budget_bytes, decode_all, drained, own_generator, raise_failures, stream_set
from deepfit.errors import DataError


class UserItems(Dataset[Item]):
    """A user's Dataset of (image, label): PIL images or (C, H, W) tensors, uint8 or float in 0..1,
    converted to `channels` and `size`; labels mapped through `label_index` when given."""

    def __init__(self, dataset: Dataset[Any], *, channels: int, size: tuple[int, int], label_index: dict[Any, int] | None) -> None:
        self.dataset, self.channels, self.size, self.label_index = dataset, channels, size, label_index

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Item:
        image, label = image_and_label(self.dataset[i], i)
        label = label_value(label, i)
        if self.label_index is not None:
            label = self.label_index[label]
        try:
            return as_uint8_image(image, self.channels, self.size), label, ""
        except DataError as err:
            return torch.zeros((self.channels, *self.size), dtype=torch.uint8), label, f"item {i}: {err}"


def image_and_label(item: Any, i: int) -> tuple[Any, Any]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise DataError(f"item {i} of the dataset is not an (image, label) pair but {type(item).__name__}")
    return item[0], item[1]


def label_value(label: Any, i: int) -> Any:
    """A plain hashable label: tensors and numpy scalars become python numbers; anything holding
    several values (a one-hot vector, a list) is refused, naming item `i`."""
    size = label.numel() if isinstance(label, torch.Tensor) else np.size(label) if isinstance(label, np.ndarray) else None
    if size not in (None, 1) or isinstance(label, (list, tuple, dict, set)):
        what = f"{type(label).__name__} of {size if size is not None else len(label)} values"
        raise DataError(
            f"item {i} of the dataset has a {what} as its label; deepfit needs one class per image (an int or a name): return label.argmax() for one-hot labels"
        )
    return label.item() if hasattr(label, "item") else label


def as_uint8_image(image: Any, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """PIL image, (C, H, W) / (H, W) tensor or (H, W, C) / (H, W) numpy array -> uint8 (channels, *size)."""
    if isinstance(image, np.ndarray):
        image = array_tensor(image)
    if isinstance(image, Image.Image):
        from torchvision.transforms.v2 import functional as tvf  # torchvision loads its model zoo: only when used

        tensor = tvf.pil_to_tensor(eight_bit(image).convert("L" if channels == 1 else "RGB"))
    elif isinstance(image, torch.Tensor):
        tensor = uint8_pixels(image if image.dim() == 3 else image.unsqueeze(0))
        tensor = conform_chunk(tensor[:3].unsqueeze(0), channels, None)[0]  # (C, H, W), alpha dropped
    else:
        raise DataError(f"images must be PIL images, (C, H, W) tensors or (H, W, C) numpy arrays, not {type(image).__name__}")
    return resize(tensor, size)


def array_tensor(array: np.ndarray) -> torch.Tensor:
    """A numpy image as PIL, OpenCV and imageio give it, (H, W) or (H, W, C), -> a (C, H, W) tensor
    of the same dtype (uint8_pixels then reads uint8, integers or floats in 0..1)."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise DataError(f"numpy images must be (H, W) or (H, W, C) with 1, 3 or 4 channels; got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def uint8_pixels(image: torch.Tensor) -> torch.Tensor:
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise DataError(f"image tensors must be (C, H, W) with 1, 3 or 4 channels; got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image
    if image.dtype == torch.uint16:  # OpenCV's and imageio's 16-bit reads: the top byte, as a 16-bit file is read
        return (image.to(torch.int32) >> 8).to(torch.uint8)
    if image.is_floating_point():
        if image.numel() and (image.min() < 0 or image.max() > 1):
            raise DataError("float image tensors must hold pixels in 0..1 (as ToTensor gives): deepfit normalises them itself")
        return image.mul(255).round_().to(torch.uint8)
    if image.numel() and (image.min() < 0 or image.max() > 255):
        raise DataError("integer image tensors must hold pixels in 0..255")
    return image.to(torch.uint8)


def collate_raw(items: list[Item]) -> tuple[torch.Tensor, list[Any], list[tuple[int, str]]]:
    """As collate_items, with the labels left as they came (ints, strings...)."""
    return torch.stack([item[0] for item in items]), [item[1] for item in items], [(i, item[2]) for i, item in enumerate(items) if item[2]]


def dataset_source(dataset: Dataset[Any], config: DataConfig) -> SourceData:
    """A user's Dataset of (image, label): decoded into memory when it fits the budget (one pass
    through the workers), else streamed. Classes are `dataset.classes` when the labels index it,
    else the sorted distinct labels."""
    count = len(dataset)  # type: ignore[arg-type]
    if count == 0:
        raise DataError("the dataset passed to fit has no items")
    shape = dataset_shape(dataset, config)
    names = getattr(dataset, "classes", None)
    origin = f"{type(dataset).__name__} passed to fit ({count:,} items)"
    streamed = config.pipeline == "stream" or (config.pipeline == "auto" and count * shape[0] * shape[1] * shape[2] > budget_bytes(config))
    if streamed:
        raw = dataset_labels(dataset, config.num_workers)
        classes, index = label_classes(raw, names)
        items = UserItems(dataset, channels=shape[0], size=shape[1:], label_index=index)
        train: ImageSet = stream_set(items, torch.tensor([index[v] for v in raw], dtype=torch.int64), shape)
    else:
        raw_items = UserItems(dataset, channels=shape[0], size=shape[1:], label_index=None)
        images, raw, failures = decode_all(raw_items, torch.arange(count), num_workers=config.num_workers, collate=collate_raw)
        raise_failures(failures, count, skip_bad=False)
        classes, index = label_classes(raw, names)
        train = ImageSet(images, torch.tensor([index[v] for v in raw], dtype=torch.int64))
    return SourceData(train=train, test=None, classes=classes, flip_ok=True, origin=origin)


SHAPE_SAMPLE = 64  # items spread over a user's Dataset whose sizes choose the training size


def dataset_shape(dataset: Dataset[Any], config: DataConfig) -> tuple[int, int, int]:
    """(C, H, W) for a user's Dataset: data.channels / data.image_size where set, else the first
    item's channels and the most common size among SHAPE_SAMPLE items spread over the dataset (the
    first item's on a tie), as an image folder takes its most common size."""
    count = len(dataset)  # type: ignore[arg-type]
    picks = sorted({i * count // SHAPE_SAMPLE for i in range(min(count, SHAPE_SAMPLE))})
    shapes = [item_shape(dataset[i], i) for i in picks]
    (height, width), _ = Counter(shape[1:] for shape in shapes).most_common(1)[0]
    side = config.image_size
    return config.channels or shapes[0][0], side or height, side or width


def item_shape(item: Any, i: int) -> tuple[int, int, int]:
    """(C, H, W) of item `i`'s image as it comes (C: 1 for grey, else 3)."""
    image, _ = image_and_label(item, i)
    try:
        return image_shape(image)
    except DataError as err:
        raise DataError(f"item {i} of the dataset: {err}") from None


def image_shape(image: Any) -> tuple[int, int, int]:
    if isinstance(image, np.ndarray):
        image = array_tensor(image)
    if isinstance(image, Image.Image):
        return 1 if image.mode in GREY_MODES else 3, image.size[1], image.size[0]
    if isinstance(image, torch.Tensor) and image.dim() in (2, 3):
        return (1 if image.dim() == 2 else min(int(image.shape[0]), 3)), int(image.shape[-2]), int(image.shape[-1])
    raise DataError(f"images must be PIL images, (C, H, W) tensors or (H, W, C) numpy arrays, not {type(image).__name__}")


def label_classes(raw: Sequence[Any], names: Any) -> tuple[list[str], dict[Any, int]]:
    """Class names and label -> index: `names` (a dataset's .classes) when every label indexes it,
    else the distinct labels sorted (numbers before strings), as strings."""
    values = set(raw)
    if names is not None and all(isinstance(v, int) and 0 <= v < len(names) for v in values):
        return [str(n) for n in names], {i: i for i in range(len(names))}
    ordered = sorted(values, key=lambda v: (isinstance(v, str), v))
    return [str(v) for v in ordered], {v: i for i, v in enumerate(ordered)}


class LabelItems(Dataset[Any]):
    """Only the labels of a user's Dataset (what the workers send back in the label pass)."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return label_value(image_and_label(self.dataset[i], i)[1], i)


def dataset_labels(dataset: Dataset[Any], num_workers: int) -> list[Any]:
    """Every item's label: `dataset.targets` when it has one per item, else one pass through the
    workers (the only way to know a streamed Dataset's classes and stratify its validation split)."""
    count = len(dataset)  # type: ignore[arg-type]
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == count:
        return [label_value(t, i) for i, t in enumerate(targets)]
    workers = num_workers if count >= WORKERS_FROM else 0
    loader = DataLoader(LabelItems(dataset), batch_size=CHUNK, num_workers=workers, collate_fn=list, generator=own_generator())
    return [label for part in drained(loader) for label in part]
