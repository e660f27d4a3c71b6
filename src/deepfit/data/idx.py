"""Reader for the IDX files of MNIST-style datasets (.gz or plain), checked against their header."""

from __future__ import annotations

import gzip
import io
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfit.errors import DataError

# IDX type byte -> numpy dtype (big-endian for the multi-byte types).
IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_IDX_BYTES = 2**31  # refuse headers that promise more than 2 GiB of data


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file into an array shaped as its header says; any mismatch is a DataError."""
    raw = read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (wrong magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: IDX header is truncated or declares no dimensions")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape) * dtype.itemsize  # python ints: no int64 wrap-around
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header declares shape {shape} ({expected} bytes) but the file holds {len(raw) - header} bytes of data"
        )
    try:
        return np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header).reshape(shape)
    except ValueError:  # e.g. (0, 3e9, 3e9): zero bytes, but more elements per row than numpy can index
        raise DataError(f"{path}: IDX header declares an impossible shape {shape}") from None


def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is gzip, capped so a gzip bomb cannot fill memory."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            out = read_capped(stream, MAX_IDX_BYTES + 1)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is a damaged gzip file: {err}") from None
    if len(out) > MAX_IDX_BYTES:
        raise DataError(f"{path} decompresses to more than {MAX_IDX_BYTES} bytes")
    return out


def read_capped(stream: gzip.GzipFile, limit: int) -> bytes:
    """Up to `limit` bytes in 1 MiB chunks: stream.read(limit) would allocate all `limit` bytes
    up front, 2 GiB for a 25-byte file (found by tests/test_fuzz.py)."""
    chunks, total = [], 0
    while total < limit:
        chunk = stream.read(min(2**20, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_idx_images(path: Path) -> torch.Tensor:
    """IDX images (N, H, W) uint8 -> tensor (N, 1, H, W)."""
    array = read_idx(path)
    if array.ndim != 3 or array.dtype != np.uint8:
        raise DataError(f"{path}: expected uint8 images of shape (N, H, W), found {array.dtype} {array.shape}")
    return torch.from_numpy(array.copy()).unsqueeze(1)


def read_idx_labels(path: Path) -> torch.Tensor:
    """IDX labels (N,) -> int64 tensor."""
    array = read_idx(path)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise DataError(f"{path}: expected a 1-D file of integer labels, found {array.dtype} {array.shape}")
    return torch.from_numpy(array.astype(np.int64))
