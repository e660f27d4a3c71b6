"""Image folders and .zip archives of them (read without unpacking): class folders, train/val/test
sub-trees, bad-file reports, and decoding everything once into uint8 tensors."""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deepfit.data.bundle import ImageSet, SourceData, bad_file_lines, size_counts
from deepfit.data.decode import Header, decode_image, decode_many, read_header, resize
from deepfit.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "Listing", "decode_image", "list_files", "load_folder_source"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
ZIP_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # 30 bytes before each member's name, extra field and data


@dataclass
class Listing:
    """The files of a folder or zip, as posix paths relative to its root."""

    root: Path
    files: list[str]
    dirs: list[str]
    fingerprint: list[tuple[str, int, int]]  # (path, bytes, mtime ns): changes when the files do
    infos: dict[str, zipfile.ZipInfo] = field(default_factory=dict)  # zip members by name

    def display(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, names: list[str]) -> list[bytes | memoryview]:
        return read_zip_members(self.root, [self.infos[n] for n in names]) if self.infos else read_files(self.root, names)


def hidden(parts: list[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def list_files(path: Path) -> Listing:
    """Visible files and folders of an image folder or a .zip of one."""
    if path.is_dir():
        return list_folder(path)
    if path.suffix.lower() == ".zip" and path.is_file():
        return list_zip(path)
    raise DataError(f"{path} is neither a folder nor a .zip of image folders")


def list_folder(root: Path) -> Listing:
    files: list[str] = []
    dirs: list[str] = []
    for folder, subdirs, names in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        subdirs[:] = sorted(d for d in subdirs if not hidden([d]))
        dirs.extend(prefix + d for d in subdirs)
        files.extend(prefix + n for n in sorted(names) if not hidden([n]))
    stats = [(root / f).stat() for f in files]
    fingerprint = [(f, s.st_size, s.st_mtime_ns) for f, s in zip(files, stats, strict=True)]
    return Listing(root, files, dirs, fingerprint)


def list_zip(path: Path) -> Listing:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path} is not a readable zip file ({err})") from None
    named = [(member_name(i), i) for i in infos]
    files = {name: i for name, i in named if not i.is_dir() and not hidden(name.split("/"))}
    dirs = {name.rstrip("/") for name, i in named if i.is_dir() and not hidden(name.split("/"))}
    dirs |= {name.rsplit("/", 1)[0] for name in files if "/" in name}
    stat = path.stat()
    return Listing(path, sorted(files), sorted(dirs), [(str(path), stat.st_size, stat.st_mtime_ns)], files)


def member_name(info: zipfile.ZipInfo) -> str:
    """The member's name as its creator spelled it: zips without the UTF-8 flag are read as cp437
    by zipfile, but macOS, Linux and most tools write UTF-8 there ('Ã©' -> 'é')."""
    name = info.filename
    if info.flag_bits & 0x800 or name.isascii():
        return name
    try:
        return name.encode("cp437").decode("utf-8")
    except UnicodeError:
        return name  # really cp437


def read_files(root: Path, names: list[str]) -> list[bytes | memoryview]:
    out: list[bytes | memoryview] = []
    for name in names:
        try:
            out.append((root / name).read_bytes())
        except OSError as err:
            raise DataError(f"cannot read {root / name}: {err.strerror}") from None
    return out


def read_zip_members(path: Path, infos: list[zipfile.ZipInfo]) -> list[bytes | memoryview]:
    """Member bytes sliced straight out of the mapped archive (zipfile.read costs ~30 us a file);
    stored and deflated members are read this way, anything else through zipfile."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        whole = bytes(mapped)  # one copy; slices of a memoryview over it are free
    view = memoryview(whole)
    out: list[bytes | memoryview] = []
    for info in infos:
        fields = ZIP_LOCAL_HEADER.unpack_from(view, info.header_offset)
        start = info.header_offset + ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1]
        data = view[start : start + info.compress_size]
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
            out.append(data)
        elif info.compress_type == zipfile.ZIP_DEFLATED and not info.flag_bits & 1:
            try:
                out.append(zlib.decompress(data, -15))
            except zlib.error:
                out.append(b"")  # reported as a bad image by the decoder
        else:
            out.append(read_with_zipfile(path, info))
    return out


def read_with_zipfile(path: Path, info: zipfile.ZipInfo) -> bytes:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(info)
    except (RuntimeError, NotImplementedError, zipfile.BadZipFile, OSError):
        return b""  # encrypted or an unsupported compression: reported as unreadable


@dataclass
class Layout:
    """Image files per split as (path, class name), and the class folders seen."""

    splits: dict[str, list[tuple[str, str]]]
    class_dirs: dict[str, list[str]]  # split -> class folder paths (to find empty ones)


def no_classes_message(path: Path, listing: Listing) -> str:
    """A folder or zip without class folders; one holding a graph's edges.csv and nodes.csv is
    told how to train on it."""
    message = f"{path} has no class folders with images (expected CLASS/IMAGE or train/CLASS/IMAGE)"
    if {"edges.csv", "nodes.csv"} <= {name.lower() for name in listing.files}:
        message += "; it holds edges.csv and nodes.csv: for node classification on that graph add --task node"
    elif any("-idx3-ubyte" in name for name in listing.files):  # MNIST's own files
        message += f"; it holds IDX files (MNIST's format): name the dataset, --data mnist (or fashion-mnist) --data-dir {path}"
    return message


def plan_layout(listing: Listing) -> Layout:
    """train/ val|valid/ test/ sub-trees when present, else top-level class folders; a single
    wrapping folder (as zips often have) is looked through."""
    prefix = common_prefix(listing)
    files = [f[len(prefix) :] for f in listing.files if f.startswith(prefix)]
    dirs = [d[len(prefix) :] for d in listing.dirs if d.startswith(prefix) and len(d) > len(prefix)]
    with_splits = any(f.split("/")[0].lower() in SPLIT_NAMES and f.count("/") >= 2 for f in files)
    depth = 1 if with_splits else 0  # index of the class folder in a path
    splits: dict[str, list[tuple[str, str]]] = {}
    class_dirs: dict[str, list[str]] = {}
    for name in files:
        parts = name.split("/")
        split = SPLIT_NAMES.get(parts[0].lower()) if with_splits else "train"
        if split is None or len(parts) < depth + 2 or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            continue  # loose files and non-image extensions are ignored
        splits.setdefault(split, []).append((prefix + name, parts[depth]))
    for name in dirs:
        parts = name.split("/")
        split = SPLIT_NAMES.get(parts[0].lower()) if with_splits else "train"
        if split is not None and len(parts) == depth + 1:
            class_dirs.setdefault(split, []).append(prefix + name)
    return Layout(splits, class_dirs)


def common_prefix(listing: Listing) -> str:
    prefix = ""
    while True:
        rest = [f[len(prefix) :] for f in listing.files if f.startswith(prefix)]
        tops = {r.split("/")[0] for r in rest if "/" in r}
        loose = [r for r in rest if "/" not in r and Path(r).suffix.lower() in IMAGE_SUFFIXES]
        if len(tops) != 1 or loose or next(iter(tops)).lower() in SPLIT_NAMES:
            return prefix
        top = next(iter(tops))
        if not all(r.count("/") >= 2 for r in rest if r.startswith(top + "/")):
            return prefix  # the one folder holds images directly: it is a class
        prefix += top + "/"


@dataclass
class Decoded:
    """Images of one split before resizing, with the failures found on the way."""

    images: list[torch.Tensor]
    classes: list[str]
    bad: list[tuple[str, str]]


def read_split(listing: Listing, entries: list[tuple[str, str]], channels: int | None) -> Decoded:
    """Read, header-check and decode one split; bombs are refused before decoding."""
    blobs = listing.read([name for name, _ in entries])
    headers: list[Header | None] = []
    bad: list[tuple[str, str]] = []
    for (name, _), blob in zip(entries, blobs, strict=True):
        try:
            headers.append(read_header(blob))
        except DataError as err:
            headers.append(None)
            bad.append((listing.display(name), str(err)))
    good = [i for i, h in enumerate(headers) if h is not None]
    good_headers = [h for h in headers if h is not None]
    wanted = channels or (1 if all(h.channels == 1 for h in good_headers) else 3)
    images, failures = decode_many([blobs[i] for i in good], good_headers, wanted)
    bad += [(listing.display(entries[good[j]][0]), reason) for j, reason in failures.items()]
    kept = [(img, entries[good[j]][1]) for j, img in enumerate(images) if img is not None]
    return Decoded([k[0] for k in kept], [k[1] for k in kept], bad)


def load_folder_source(
    path: Path, *, image_size: int | None, channels: int | None, skip_bad: bool, listing: Listing | None = None
) -> SourceData:
    """Decode a folder or zip of class folders into memory; bad files stop the load unless skipped.
    `listing` is list_files(path) when the caller already has it."""
    listing = listing if listing is not None else list_files(path)
    layout = plan_layout(listing)
    if "train" not in layout.splits:
        raise DataError(no_classes_message(path, listing))
    first = read_split(listing, layout.splits["train"], channels)
    wanted = channels or (first.images[0].shape[0] if first.images else 3)
    decoded = {"train": first}
    for split in ("val", "test"):
        if split in layout.splits:
            decoded[split] = read_split(listing, layout.splits[split], wanted)
    bad = [b for d in decoded.values() for b in d.bad] + empty_classes(listing, layout, decoded)
    if bad and not skip_bad:
        raise DataError(bad_files_message(path, bad))
    if not first.images:
        raise DataError(f"{path}: not one readable training image\n" + bad_file_lines(bad))
    size = (image_size, image_size) if image_size else most_common_size(first.images)
    classes = sorted(set(first.classes))  # class folders left without readable images are among the bad
    sets = {split: to_image_set(d, classes, size, path, split) for split, d in decoded.items()}
    return SourceData(
        train=sets["train"], val=sets.get("val"), test=sets.get("test"), classes=classes,
        flip_ok=True, origin=str(path), skipped=bad,
        sizes=size_counts((int(i.shape[1]), int(i.shape[2])) for d in decoded.values() for i in d.images),
    )  # fmt: skip


def empty_classes(listing: Listing, layout: Layout, decoded: dict[str, Decoded]) -> list[tuple[str, str]]:
    """Class folders (in any split) left without a single readable image."""
    out = []
    for split, dirs in layout.class_dirs.items():
        present = set(decoded[split].classes) if split in decoded else set()
        out += [(listing.display(d), "empty class folder: no readable images") for d in dirs if d.rsplit("/", 1)[-1] not in present]
    return out


def most_common_size(images: list[torch.Tensor]) -> tuple[int, int]:
    if not images:
        raise DataError("no readable images to take a size from")
    (height, width), _ = Counter((int(i.shape[1]), int(i.shape[2])) for i in images).most_common(1)[0]
    return height, width


def to_image_set(decoded: Decoded, classes: list[str], size: tuple[int, int], path: Path, split: str) -> ImageSet:
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({c for c in decoded.classes if c not in index})
    if unknown:
        raise DataError(f"{path}: {split}/ has classes that train/ lacks: {', '.join(unknown)}")
    images = torch.stack([resize(img, size) for img in decoded.images]) if decoded.images else torch.zeros(0, 1, *size, dtype=torch.uint8)
    labels = torch.tensor([index[c] for c in decoded.classes], dtype=torch.int64)
    return ImageSet(images, labels)


SKIP_HINT = "fix or remove them, or leave them out (deepfit train --data.skip-bad true, deepfit evaluate --skip-bad)"


def bad_files_message(path: Path, bad: list[tuple[str, str]]) -> str:
    """The summary line, then one line per bad file: path and reason."""
    return f"{path}: {len(bad)} bad file(s); {SKIP_HINT}:\n{bad_file_lines(bad)}"
