"""Decoded sources cached on disk: a uint8 tensor file keyed by the source's path, its files'
sizes and mtimes and the decode settings, written atomically, loaded in a fraction of a second."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from deepfit.data.bundle import ImageSet, SourceData
from deepfit.runtime import default_cache_dir

# Bump when the stored layout or the decoding changes meaning (2: 16-bit grey scaled, not clipped;
# 3: a CSV header's label column read wherever it stands).
CACHE_FORMAT = 3


def cache_key(kind: str, fingerprint: list[Any], settings: Mapping[str, object]) -> str:
    """A hex digest that changes with the source's files and the decode settings."""
    text = json.dumps({"format": CACHE_FORMAT, "kind": kind, "files": fingerprint, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_path(kind: str, key: str, cache_dir: str | None) -> Path:
    return Path(cache_dir or os.path.join(default_cache_dir(), "data")) / f"{kind}-{key}.pt"


def cached_source(path: Path | None, build: Callable[[], SourceData]) -> SourceData:
    """The cached source at `path` if there is one, else build it and store it (path None: no cache)."""
    if path is None:
        return build()
    if path.is_file():
        loaded = load_cached(path)
        if loaded is not None:
            return loaded
    source = build()
    save_cached(source, path)
    return source


def save_cached(source: SourceData, path: Path) -> None:
    """Write to a temporary file beside the target, then rename: readers never see half a file."""
    state: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "classes": list(source.classes),
        "flip_ok": source.flip_ok,
        "origin": source.origin,
        "skipped": [list(item) for item in source.skipped],
        "sizes": dict(source.sizes),
    }
    for split in ("train", "val", "test"):
        images = getattr(source, split)
        if images is not None:
            state[f"{split}_images"] = images.images.contiguous()
            state[f"{split}_labels"] = images.labels
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError:
        return  # a cache is optional: no writable cache folder, no cache
    os.close(handle)
    try:
        torch.save(state, temp)
        os.replace(temp, path)
    except (OSError, RuntimeError):  # torch reports a full disk as RuntimeError
        Path(temp).unlink(missing_ok=True)


def load_cached(path: Path) -> SourceData | None:
    """A cached source, or None when the file is unreadable or from another format version."""
    try:
        state = torch.load(path, weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, EOFError):
        return None
    if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT:
        return None
    sets = {
        split: ImageSet(state[f"{split}_images"], state[f"{split}_labels"]) if f"{split}_images" in state else None
        for split in ("train", "val", "test")
    }
    train = sets["train"]
    if train is None:
        return None
    return SourceData(
        train=train, val=sets["val"], test=sets["test"], classes=list(state["classes"]), flip_ok=bool(state["flip_ok"]),
        origin=str(state["origin"]), skipped=[(str(p), str(r)) for p, r in state["skipped"]],
        sizes={str(size): int(n) for size, n in state.get("sizes", {}).items()},  # not in caches written before it was kept
    )  # fmt: skip
