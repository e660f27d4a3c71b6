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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from deepfit.config import DataConfig
from deepfit.data.bundle import ImageSet, SourceData, size_counts
from deepfit.data.decode import Header, decode_many, read_header, resize
from deepfit.data.folder import (
    IMAGE_SUFFIXES,
    SKIP_HINT,
    ZIP_LOCAL_HEADER,
    Decoded,
    Listing,
    bad_files_message,
    empty_classes,
    hidden,
    list_files,
    no_classes_message,
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
    """Image files decoded a batch at a time (JPEGs in one batched torchvision.io call: ~3.5x the
    rate of one call per file), converted and resized exactly as the in-memory pipeline does."""

    def __init__(self, reader: FileReader, names: list[str], labels: list[int], *, channels: int, size: tuple[int, int]) -> None:
        self.reader, self.names, self.labels = reader, names, labels
        self.channels, self.size = channels, size

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Item:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[Item]:
        """What the DataLoader's workers call for a whole batch of positions."""
        blobs: dict[int, bytes] = {}
        headers: dict[int, Header] = {}
        reasons: dict[int, str] = {}
        for i in indices:
            try:
                blobs[i] = self.reader.read(self.names[i])
                headers[i] = read_header(blobs[i])
            except DataError as err:
                reasons[i] = str(err)
            except OSError as err:
                reasons[i] = f"cannot read ({err.strerror})"
        good = list(headers)
        images, failures = decode_many([blobs[i] for i in good], [headers[i] for i in good], self.channels)
        reasons |= {good[j]: reason for j, reason in failures.items()}
        decoded = dict(zip(good, images, strict=True))
        return [self.item(i, decoded.get(i), reasons.get(i)) for i in indices]

    def item(self, i: int, image: torch.Tensor | None, reason: str | None) -> Item:
        if image is None or reason is not None:
            return (
                torch.zeros((self.channels, *self.size), dtype=torch.uint8),
                self.labels[i],
                f"{self.reader.root}/{self.names[i]}: {reason}",
            )
        return resize(image, self.size), self.labels[i], ""


class TensorItems(Dataset[Item]):
    """An in-memory split served item by item (data.pipeline stream on a source that is decoded whole)."""

    def __init__(self, images: ImageSet) -> None:
        self.images, self.labels = images.images, images.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Item:
        return self.images[i], int(self.labels[i]), ""


def collate_items(items: list[Item]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """Items -> uint8 (B, C, H, W), int64 labels (B,) and (position in batch, failure) pairs."""
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([item[1] for item in items], dtype=torch.int64)
    return images, labels, [(i, item[2]) for i, item in enumerate(items) if item[2]]


def raise_failures(failures: list[tuple[int, str]], size: int, *, skip_bad: bool) -> torch.Tensor | None:
    """None when a batch decoded cleanly; a keep-mask (B,) with data.skip_bad; else a DataError."""
    if not failures:
        return None
    lines = "\n".join(f"  {reason}" for _, reason in failures)
    if not skip_bad:
        raise DataError(f"{len(failures)} bad image(s) met while streaming; {SKIP_HINT}:\n{lines}")
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
    for images_part, labels_part, failed in drained(loader):
        failures += [(len(labels) + i, reason) for i, reason in failed]
        images.append(images_part)
        labels += list(labels_part)
    return torch.cat(images), labels, failures


def drained(loader: DataLoader[Any]) -> Iterator[Any]:
    """The loader's batches, for a pass that reads them all. A DataError raised in a worker comes
    out as its own one-line message, not torch's 'Caught DataError in DataLoader worker process N'
    and the worker's traceback. On any error the workers are stopped here: a DataLoader forked
    later would otherwise collect this iterator in its worker and print torch's 'can only test a
    child process' (seen when a notebook calls fit again after a bad Dataset)."""
    iterator = iter(loader)
    try:
        yield from iterator
    except DataError as err:
        raise DataError(worker_message(err)) from None
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's own cleanup (its __del__ calls it too); none without workers
        if shutdown is not None:
            shutdown()


def worker_message(err: DataError) -> str:
    """The original message of a DataError re-raised from a DataLoader worker (the last line of the
    traceback torch puts in its message); any other DataError's own."""
    text = str(err)
    if not text.startswith("Caught DataError in DataLoader worker"):
        return text
    return text.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]


def load_images(split: ImageSet, *, num_workers: int = 2, skip_bad: bool = False) -> ImageSet:
    """The split with its pixels in memory: itself when it is, else every item decoded (for code
    that reads `.images`: a few streamed samples to plot, a small split to evaluate)."""
    if not isinstance(split, StreamSet):
        return split
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
    return load_images(train.subset(pick), num_workers=num_workers, skip_bad=skip_bad).images


def settle(split: ImageSet | None, config: DataConfig) -> ImageSet | None:
    """Validation and test splits are decoded into memory unless they alone exceed the memory
    budget: they are read every epoch, and evaluate/inspect take them as tensors."""
    if isinstance(split, StreamSet) and split.decoded_bytes <= budget_bytes(config):
        return load_images(split, num_workers=config.num_workers, skip_bad=config.skip_bad)
    return split


def budget_bytes(config: DataConfig) -> int:
    return config.memory_budget_mb * 2**20


def pipeline_source(config: DataConfig, *, registered: bool, load: Callable[[], SourceData]) -> SourceData:
    """The source as data.pipeline wants it: an image folder/zip streamed when forced or (auto)
    larger than the budget, else `load()`ed into memory; `stream` also serves an in-memory
    source's training split through the workers. (A user's Dataset: user_dataset.py.)"""
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
    try:
        count, blobs = folder_census(path) if path.is_dir() else zip_census(path)
    except (OSError, ValueError, IndexError, struct.error, DataError):
        return 0  # empty, unreadable or corrupt: the in-memory path reports it properly
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
    count = 0
    blobs: list[bytes] = []
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
        raise DataError(no_classes_message(path, listing))
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
        sizes=size_counts((h.height, h.width) for c in checked.values() for h in c.headers),
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
