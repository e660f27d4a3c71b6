"""The streaming side of the pipeline: splits whose pixels stay in their files (or in a user's
Dataset) and are decoded per item in DataLoader workers, and the choice between memory and
streaming (data.pipeline; `auto` streams when the decoded size would exceed data.memory_budget_mb)."""

from __future__ import annotations

import mmap
import os
import struct
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as tvf

from deepfit.config import DataConfig
from deepfit.data.bundle import ImageSet, SourceData, conform_chunk
from deepfit.data.decode import GREY_MODES, Header, decode_one, read_header, resize
from deepfit.data.folder import (
    IMAGE_SUFFIXES,
    ZIP_LOCAL_HEADER,
    Decoded,
    Listing,
    bad_files_message,
    empty_classes,
    hidden,
    list_files,
    plan_layout,
    read_with_zipfile,
)
from deepfit.errors import DataError

Item = tuple[torch.Tensor, Any, str]  # uint8 (C, H, W) (zeros when unreadable), label, "" or "what: why"
STATS_SAMPLE = 4096  # training images decoded to measure the normalisation stats of a streamed split
SIZE_SAMPLE = 16  # image headers read to estimate a folder's decoded size
CHUNK = 256  # images per DataLoader batch when a streamed split is decoded whole
WORKERS_FROM = 1024  # decode with worker processes from this many images (fewer: in this process)


@dataclass
class StreamSet(ImageSet):
    """A split decoded per item: `items` turns a position into (uint8 (C, H, W), label, failure)
    and `index` (N,) says which positions belong to the split. `images` holds no pixels: it is an
    empty (0, C, H, W) tensor that only carries the shape; `labels` (N,) are known up front."""

    items: Dataset[Item]
    index: torch.Tensor

    def subset(self, index: torch.Tensor) -> StreamSet:
        return StreamSet(self.images, self.labels[index], self.items, self.index[index])

    @property
    def decoded_bytes(self) -> int:
        return len(self) * int(torch.Size(self.images.shape[1:]).numel())


def stream_set(items: Dataset[Item], labels: torch.Tensor, shape: tuple[int, int, int]) -> StreamSet:
    return StreamSet(torch.empty((0, *shape), dtype=torch.uint8), labels, items, torch.arange(len(labels)))


class FileReader:
    """One file's bytes from a folder or a zip. A zip is memory-mapped once per process: worker
    processes share the mapping after fork, where a shared file offset would race."""

    def __init__(self, listing: Listing) -> None:
        self.root = listing.root
        self.infos = listing.infos
        self.mapped: mmap.mmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "mapped": None}  # mapped again where it is unpickled

    def read(self, name: str) -> bytes:
        if not self.infos:
            return (self.root / name).read_bytes()
        info = self.infos[name]
        if info.flag_bits & 1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            return read_with_zipfile(self.root, info)
        if self.mapped is None:
            with self.root.open("rb") as handle:
                self.mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return member_bytes(self.mapped, info.header_offset, info.compress_size, info.compress_type)


class FileItems(Dataset[Item]):
    """Image files decoded one by one (torchvision.io for JPEGs), converted and resized exactly as
    the in-memory pipeline decodes them."""

    def __init__(self, reader: FileReader, names: list[str], labels: list[int], *, channels: int, size: tuple[int, int]) -> None:
        self.reader, self.names, self.labels = reader, names, labels
        self.channels, self.size = channels, size

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Item:
        try:
            data = self.reader.read(self.names[i])
            return resize(decode_one(data, self.channels, read_header(data)), self.size), self.labels[i], ""
        except (DataError, OSError) as err:
            reason = err if isinstance(err, DataError) else f"cannot read ({err.strerror})"
            return (
                torch.zeros((self.channels, *self.size), dtype=torch.uint8),
                self.labels[i],
                f"{self.reader.root}/{self.names[i]}: {reason}",
            )


class TensorItems(Dataset[Item]):
    """An in-memory split served item by item (data.pipeline stream on a source that is decoded whole)."""

    def __init__(self, images: ImageSet) -> None:
        self.images, self.labels = images.images, images.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Item:
        return self.images[i], int(self.labels[i]), ""


class UserItems(Dataset[Item]):
    """A user's Dataset of (image, label): PIL images or (C, H, W) tensors, uint8 or float in 0..1,
    converted to `channels` and `size`; labels mapped through `label_index` when given."""

    def __init__(self, dataset: Dataset[Any], *, channels: int, size: tuple[int, int], label_index: dict[Any, int] | None) -> None:
        self.dataset, self.channels, self.size, self.label_index = dataset, channels, size, label_index

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Item:
        image, label = image_and_label(self.dataset[i], i)
        label = label_value(label)
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


def label_value(label: Any) -> Any:
    """A plain hashable label: tensors and numpy scalars become python numbers."""
    return label.item() if hasattr(label, "item") else label


def as_uint8_image(image: Any, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """PIL image or (C, H, W) / (H, W) tensor -> uint8 (channels, *size)."""
    if isinstance(image, Image.Image):
        tensor = tvf.pil_to_tensor(image.convert("L" if channels == 1 else "RGB"))
    elif isinstance(image, torch.Tensor):
        tensor = uint8_pixels(image if image.dim() == 3 else image.unsqueeze(0))
        tensor = conform_chunk(tensor[:3].unsqueeze(0), channels, None)[0]  # (C, H, W), alpha dropped
    else:
        raise DataError(f"images must be PIL images or (C, H, W) tensors, not {type(image).__name__}")
    return resize(tensor, size)


def uint8_pixels(image: torch.Tensor) -> torch.Tensor:
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise DataError(f"image tensors must be (C, H, W) with 1, 3 or 4 channels; got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image
    if image.is_floating_point():
        if image.numel() and (image.min() < 0 or image.max() > 1):
            raise DataError("float image tensors must hold pixels in 0..1 (as ToTensor gives): deepfit normalises them itself")
        return image.mul(255).round_().to(torch.uint8)
    if image.numel() and (image.min() < 0 or image.max() > 255):
        raise DataError("integer image tensors must hold pixels in 0..255")
    return image.to(torch.uint8)


def collate_items(items: list[Item]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """Items -> uint8 (B, C, H, W), int64 labels (B,) and (position in batch, failure) pairs."""
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([item[1] for item in items], dtype=torch.int64)
    return images, labels, [(i, item[2]) for i, item in enumerate(items) if item[2]]


def collate_raw(items: list[Item]) -> tuple[torch.Tensor, list[Any], list[tuple[int, str]]]:
    """As collate_items, with the labels left as they came (ints, strings...)."""
    return torch.stack([item[0] for item in items]), [item[1] for item in items], [(i, item[2]) for i, item in enumerate(items) if item[2]]


def raise_failures(failures: list[tuple[int, str]], size: int, *, skip_bad: bool) -> torch.Tensor | None:
    """None when a batch decoded cleanly; a keep-mask (B,) with data.skip_bad; else a DataError."""
    if not failures:
        return None
    lines = "\n".join(f"  {reason}" for _, reason in failures)
    if not skip_bad:
        raise DataError(f"{len(failures)} bad image(s) met while streaming; fix or remove them, or pass --data.skip-bad true:\n{lines}")
    warnings.warn(f"skipped {len(failures)} bad image(s) while streaming:\n{lines}", stacklevel=2)
    keep = torch.ones(size, dtype=torch.bool)
    keep[[i for i, _ in failures]] = False
    return keep


def own_generator() -> torch.Generator:
    """For every DataLoader here: without one, each new iterator draws its workers' base seed from
    torch's global generator, which would shift the model's initialisation and dropout (and so
    break exact resume); decoding uses no randomness, so a constant seed serves."""
    return torch.Generator().manual_seed(0)


def decode_all(
    items: Dataset[Item], index: torch.Tensor, *, num_workers: int, collate: Callable[[list[Item]], Any] = collate_items
) -> tuple[torch.Tensor, list[Any], list[tuple[int, str]]]:
    """Items at `index`, in order: uint8 (N, C, H, W), labels, (position, failure) pairs."""
    chunks = [index[i : i + CHUNK].tolist() for i in range(0, len(index), CHUNK)]
    workers = num_workers if len(index) >= WORKERS_FROM else 0
    images: list[torch.Tensor] = []
    labels: list[Any] = []
    failures: list[tuple[int, str]] = []
    loader = DataLoader(items, batch_sampler=chunks, num_workers=workers, collate_fn=collate, generator=own_generator())
    for images_part, labels_part, failed in loader:
        failures += [(len(labels) + i, reason) for i, reason in failed]
        images.append(images_part)
        labels += list(labels_part)
    return torch.cat(images), labels, failures


def to_memory(split: StreamSet, *, num_workers: int, skip_bad: bool) -> ImageSet:
    """Decode a whole streamed split into an in-memory ImageSet."""
    if isinstance(split.items, TensorItems):
        return ImageSet(split.items.images[split.index], split.labels)
    if len(split) == 0:
        return ImageSet(split.images, split.labels)
    images, _, failures = decode_all(split.items, split.index, num_workers=num_workers)
    keep = raise_failures(failures, len(split), skip_bad=skip_bad)
    return ImageSet(images, split.labels) if keep is None else ImageSet(images[keep], split.labels[keep])


def stats_images(train: ImageSet, *, seed: int, num_workers: int, skip_bad: bool = False) -> torch.Tensor:
    """The images to measure normalisation stats on: all of an in-memory split; of a streamed one
    all up to STATS_SAMPLE, else a seeded sample of that many (decoding them all costs an epoch)."""
    if not isinstance(train, StreamSet):
        return train.images
    pick = torch.arange(len(train))
    if len(train) > STATS_SAMPLE:
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:STATS_SAMPLE].sort().values
    return to_memory(train.subset(pick), num_workers=num_workers, skip_bad=skip_bad).images


def settle(split: ImageSet | None, config: DataConfig) -> ImageSet | None:
    """Validation and test splits are decoded into memory unless they alone exceed the memory
    budget: they are read every epoch, and evaluate/inspect take them as tensors."""
    if isinstance(split, StreamSet) and split.decoded_bytes <= budget_bytes(config):
        return to_memory(split, num_workers=config.num_workers, skip_bad=config.skip_bad)
    return split


def budget_bytes(config: DataConfig) -> int:
    return config.memory_budget_mb * 2**20


def pipeline_source(config: DataConfig, dataset: Dataset[Any] | None, *, registered: bool, load: Callable[[], SourceData]) -> SourceData:
    """The source as data.pipeline wants it: a user's Dataset or an image folder/zip streamed when
    forced or (auto) larger than the budget, else `load()`ed into memory; `stream` also serves an
    in-memory source's training split through the workers."""
    if dataset is not None:
        return dataset_source(dataset, config)
    path = Path(config.name).expanduser()
    is_folder = not registered and (path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip"))
    if is_folder and (
        config.pipeline == "stream" or (config.pipeline == "auto" and estimate_folder_bytes(path, config) > budget_bytes(config))
    ):
        return stream_folder_source(path, config)
    source = load()
    if config.pipeline == "stream" and not isinstance(source.train, StreamSet):
        source.train = stream_set(TensorItems(source.train), source.train.labels, shape_of(source.train))
    return source


def shape_of(images: ImageSet) -> tuple[int, int, int]:
    c, h, w = images.images.shape[1:]
    return int(c), int(h), int(w)


def estimate_folder_bytes(path: Path, config: DataConfig) -> int:
    """N * C * H * W of a folder or zip from its image count and a few headers, without listing
    the whole archive through zipfile (0.8 s for CIFAR-10's 60,000 members)."""
    count, blobs = folder_census(path) if path.is_dir() else zip_census(path)
    headers = [h for h in (header_or_none(b) for b in blobs) if h is not None]
    if not headers or count == 0:
        return 0  # nothing to measure: the in-memory path reports what is wrong
    height, width = Counter((h.height, h.width) for h in headers).most_common(1)[0][0]
    if config.image_size:
        height = width = config.image_size
    channels = config.channels or (1 if all(h.channels == 1 for h in headers) else 3)
    return count * channels * height * width


def header_or_none(data: bytes) -> Header | None:
    try:
        return read_header(data)
    except DataError:
        return None


def folder_census(root: Path) -> tuple[int, list[bytes]]:
    """Image files under `root` and the bytes of the first SIZE_SAMPLE of them."""
    count, blobs = 0, list[bytes]()
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not hidden([d]))
        for name in sorted(names):
            if is_image_name(name):
                count += 1
                if len(blobs) < SIZE_SAMPLE:
                    blobs.append(Path(folder, name).read_bytes())
    return count, blobs


EOCD = struct.Struct("<4s4H2IH")  # zip end-of-central-directory record
CENTRAL = struct.Struct("<4s6H3I5H2I")  # a zip central-directory entry, before its name


def zip_census(path: Path) -> tuple[int, list[bytes]]:
    """Image members of a zip and the bytes of SIZE_SAMPLE of them spread over the archive, from
    its central directory read directly; a zip64 or unreadable one is listed by zipfile instead."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        end = view.rfind(b"PK\x05\x06", max(0, len(view) - 65_557))
        _, _, _, _, total, _, at, _ = EOCD.unpack_from(view, end) if end >= 0 else (b"", 0, 0, 0, 0, 0, 0, 0)
        walkable = total != 0xFFFF and at != 0xFFFFFFFF  # else zip64: counts and offsets live elsewhere
        members = []  # (local header offset, compressed size, method) of each image member
        for _ in range(total if walkable else 0):
            fields = CENTRAL.unpack_from(view, at)
            name = view[at + CENTRAL.size : at + CENTRAL.size + fields[10]].decode("utf-8", "replace")
            if is_image_name(name) and not fields[3] & 1:
                members.append((fields[16], fields[8], fields[4]))
            at += CENTRAL.size + fields[10] + fields[11] + fields[12]
        step = max(1, len(members) // SIZE_SAMPLE)
        blobs = [member_bytes(view, *member) for member in members[::step][:SIZE_SAMPLE]]
    if not members:  # zip64, or not a zip this can walk: the slow, sure way
        listing = list_files(path)
        reader = FileReader(listing)
        return len(listing.files), [reader.read(n) for n in listing.files[:SIZE_SAMPLE]]
    return len(members), blobs


def is_image_name(name: str) -> bool:
    """A visible file with an image extension (string operations: this runs per zip member)."""
    dot = name.rfind(".")
    return dot > name.rfind("/") and name[dot:].lower() in IMAGE_SUFFIXES and "/." not in "/" + name and "__MACOSX" not in name


def member_bytes(view: mmap.mmap, offset: int, size: int, method: int) -> bytes:
    """A stored or deflated zip member's bytes, from its local header at `offset`; b"" if unreadable."""
    fields = ZIP_LOCAL_HEADER.unpack_from(view, offset)
    start = offset + ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1]
    data = view[start : start + size]
    if method == zipfile.ZIP_STORED:
        return data
    try:
        return zlib.decompress(data, -15) if method == zipfile.ZIP_DEFLATED else b""
    except zlib.error:
        return b""  # reported as not an image


@dataclass
class CheckedSplit:
    """One split's files that passed the header check, with their headers, and the ones that failed."""

    entries: list[tuple[str, str]]  # (path in the listing, class name)
    headers: list[Header]
    bad: list[tuple[str, str]]  # (path, reason)


def check_headers(listing: Listing, reader: FileReader, entries: list[tuple[str, str]]) -> CheckedSplit:
    """Read every file's header (bombs and non-images refused before training starts)."""
    checked = CheckedSplit([], [], [])
    for name, label in entries:
        try:
            checked.headers.append(read_header(reader.read(name)))
            checked.entries.append((name, label))
        except (DataError, OSError) as err:
            checked.bad.append((listing.display(name), str(err) if isinstance(err, DataError) else f"cannot read ({err.strerror})"))
    return checked


def stream_folder_source(path: Path, config: DataConfig) -> SourceData:
    """A folder or zip of class folders as StreamSets: listed and header-checked now, decoded per
    batch later. Size, channels, classes and bad-file handling follow load_folder_source."""
    listing = list_files(path)
    layout = plan_layout(listing)
    if "train" not in layout.splits:
        raise DataError(f"{path} has no class folders with images (expected CLASS/IMAGE or train/CLASS/IMAGE)")
    reader = FileReader(listing)
    checked = {split: check_headers(listing, reader, entries) for split, entries in layout.splits.items()}
    decoded = {split: Decoded([], [label for _, label in c.entries], []) for split, c in checked.items()}
    bad = [b for c in checked.values() for b in c.bad] + empty_classes(listing, layout, decoded)
    if bad and not config.skip_bad:
        raise DataError(bad_files_message(path, bad))
    train = checked["train"]
    if not train.entries:
        raise DataError(f"{path}: not one readable training image")
    channels = config.channels or (1 if all(h.channels == 1 for h in train.headers) else 3)
    size = (config.image_size, config.image_size) if config.image_size else most_common(train.headers)
    classes = sorted({label for _, label in train.entries})
    sets = {split: file_split(reader, c.entries, classes, channels, size, f"{path}: {split}/") for split, c in checked.items()}
    return SourceData(
        train=sets["train"], val=sets.get("val"), test=sets.get("test"), classes=classes,
        flip_ok=True, origin=str(path), skipped=bad,
    )  # fmt: skip


def most_common(headers: Sequence[Header]) -> tuple[int, int]:
    return Counter((h.height, h.width) for h in headers).most_common(1)[0][0]


def file_split(
    reader: FileReader, entries: list[tuple[str, str]], classes: list[str], channels: int, size: tuple[int, int], where: str
) -> StreamSet:
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({label for _, label in entries if label not in index})
    if unknown:
        raise DataError(f"{where} has classes that train/ lacks: {', '.join(unknown)}")
    labels = [index[label] for _, label in entries]
    items = FileItems(reader, [name for name, _ in entries], labels, channels=channels, size=size)
    return stream_set(items, torch.tensor(labels, dtype=torch.int64), (channels, *size))


def dataset_source(dataset: Dataset[Any], config: DataConfig) -> SourceData:
    """A user's Dataset of (image, label): decoded into memory when it fits the budget (one pass
    through the workers), else streamed. Classes are `dataset.classes` when the labels index it,
    else the sorted distinct labels."""
    count = len(dataset)  # type: ignore[arg-type]
    if count == 0:
        raise DataError("the dataset passed to fit has no items")
    shape = first_shape(dataset, config)
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


def first_shape(dataset: Dataset[Any], config: DataConfig) -> tuple[int, int, int]:
    """(C, H, W) for a user's Dataset: data.channels / data.image_size where set, else the first item's."""
    image, _ = image_and_label(dataset[0], 0)
    if isinstance(image, Image.Image):
        channels, (width, height) = 1 if image.mode in GREY_MODES else 3, image.size
    elif isinstance(image, torch.Tensor) and image.dim() in (2, 3):
        channels, height, width = (1 if image.dim() == 2 else min(int(image.shape[0]), 3)), int(image.shape[-2]), int(image.shape[-1])
    else:
        raise DataError(f"images must be PIL images or (C, H, W) tensors, not {type(image).__name__}")
    side = config.image_size
    return config.channels or channels, side or height, side or width


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
        return label_value(image_and_label(self.dataset[i], i)[1])


def dataset_labels(dataset: Dataset[Any], num_workers: int) -> list[Any]:
    """Every item's label: `dataset.targets` when it has one per item, else one pass through the
    workers (the only way to know a streamed Dataset's classes and stratify its validation split)."""
    count = len(dataset)  # type: ignore[arg-type]
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == count:
        return [label_value(t) for t in targets]
    workers = num_workers if count >= WORKERS_FROM else 0
    loader = DataLoader(LabelItems(dataset), batch_size=CHUNK, num_workers=workers, collate_fn=list, generator=own_generator())
    return [label for part in loader for label in part]
