"""`--data PATH`: a folder or .zip of class folders, or a .csv/.csv.gz of pixel rows, decoded once
and cached; also the cached loaders of the named file-backed datasets."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from deepfit.config import DataConfig
from deepfit.data.bundle import SourceData
from deepfit.data.cache import cache_key, cache_path, cached_source
from deepfit.data.cifar import load_cifar_source, locate_cifar
from deepfit.data.csv_rows import load_csv_source, require_label_column, sibling_test
from deepfit.data.folder import bad_files_message, list_files, load_folder_source
from deepfit.data.sources import IDX_DATASETS, IDX_FILES, download_idx, find_idx_folder, idx_path, load_idx_source, not_found_message
from deepfit.errors import DataError

Fingerprint = list[tuple[str, int, int]]  # (path, bytes, mtime ns) per file


def is_csv(path: Path) -> bool:
    return path.name.lower().endswith((".csv", ".csv.gz"))


def is_data_path(path: Path) -> bool:
    """An existing folder, .zip, .csv or .csv.gz file."""
    return path.is_dir() or (path.is_file() and (path.suffix.lower() == ".zip" or is_csv(path)))


def file_fingerprint(paths: list[Path]) -> Fingerprint:
    stats = [(p.resolve(), p.stat()) for p in paths]
    return [(str(p), s.st_size, s.st_mtime_ns) for p, s in stats]


def cache_file(config: DataConfig, kind: str, fingerprint: Fingerprint, settings: Mapping[str, object]) -> Path | None:
    return cache_path(kind, cache_key(kind, fingerprint, settings), config.cache_dir) if config.cache else None


def folder_cache_file(path: Path, config: DataConfig, fingerprint: Fingerprint) -> Path | None:
    """Keyed by the folder's or zip's own path, every file's name, size and mtime, and the decode settings."""
    settings = {"image_size": config.image_size, "channels": config.channels}
    return cache_file(config, "folder", [(str(path.resolve()), 0, 0), *fingerprint], settings)


def load_path_source(path: Path, config: DataConfig) -> SourceData:
    """A folder, .zip or CSV path; bad image files stop here unless data.skip_bad."""
    if is_csv(path):
        return load_csv_path(path, config)
    refuse_run_folder(path)
    if path.is_dir():
        refuse_runs_inside(path)
    # a zip's own size and mtime stand for its members: the cache is found without reading its
    # directory (0.6 s for CIFAR-10's 60,000 members); a folder is listed to see its files
    listing = list_files(path) if path.is_dir() else None
    where = folder_cache_file(path, config, listing.fingerprint if listing is not None else file_fingerprint([path]))
    # decoded with the bad files left out, so the cache serves both choices of skip_bad
    source = cached_source(
        where, lambda: load_folder_source(path, image_size=config.image_size, channels=config.channels, skip_bad=True, listing=listing)
    )
    if source.skipped and not config.skip_bad:
        raise DataError(bad_files_message(path, source.skipped))
    return source


def refuse_run_folder(path: Path) -> None:
    """A run folder given as data would train on its plots/ as a class of images."""
    if any((path / "checkpoints" / name).is_file() for name in ("last.pt", "best.pt")):
        raise DataError(
            f"{path} is a deepfit run folder, not images in class folders: start from its weights with --init-from {path},"
            f" or score it with `deepfit evaluate {path}`"
        )


def refuse_runs_inside(folder: Path) -> None:
    """A run folder among the class folders (or in one, as runs/NAME) is read as images of a class:
    its plots. Training again on the folder would add that class, and resuming the run would
    find one class more than its weights have."""
    runs = sorted({p.parents[1] for pattern in ("*/checkpoints/*.pt", "*/*/checkpoints/*.pt") for p in folder.glob(pattern)})
    if runs:
        raise DataError(
            f"{runs[0]} is a deepfit run inside the image folder {folder}: its plots would be read as images of a class;"
            f" move it out of {folder}"
        )


def csv_files(path: Path) -> list[Path]:
    """The CSV and, when its name says train, the sibling that says test."""
    test = sibling_test(path)
    return [path, test] if test is not None else [path]


def load_csv_path(path: Path, config: DataConfig) -> SourceData:
    where = cache_file(config, "csv", file_fingerprint(csv_files(path)), {"image_shape": config.image_shape})
    source = cached_source(where, lambda: load_csv_source(path, image_shape=config.image_shape))
    require_label_column(path, source.train)  # checked on every load: caches made before the check hold such files
    return source


def load_cifar10(config: DataConfig) -> SourceData:
    folder = locate_cifar(config.dir, config.download)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return cached_source(cache_file(config, "cifar10", file_fingerprint(files), {}), lambda: load_cifar_source(folder))


def load_idx_cached(name: str, config: DataConfig) -> SourceData:
    """MNIST-format files: reading them is already fast; the cache saves the gunzip (~0.4 s)."""
    spec = IDX_DATASETS[name]
    folder = find_idx_folder(spec, config.dir)
    if folder is None and config.download:
        folder = download_idx(spec, config.dir)
    if folder is None:
        raise DataError(not_found_message(spec, config.dir))
    files = [p for stem in IDX_FILES.values() if (p := idx_path(folder, stem)) is not None]
    where = cache_file(config, name, file_fingerprint(files), {})
    return cached_source(where, lambda: load_idx_source(name, data_dir=str(folder), download=False))
