"""Fuzzed inputs: the IDX reader, the CSV reader, the image decoder and the checkpoint loader get
thousands of generated files; each is either read or refused with the project's own error (a
DeepfitError), never another exception, a hang (hypothesis deadline) or a memory blow-up
(tracemalloc peak bounded by the input size, where the reader allocates through numpy/python)."""

from __future__ import annotations

import contextlib
import gzip
import io
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (the dev extra); a bare GPU machine has none")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepfit.checkpoint import load_checkpoint, save_checkpoint
from deepfit.data.idx import IDX_TYPES, read_idx, read_idx_images, read_idx_labels
from deepfit.errors import DeepfitError

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's note on odd protocols
SHORT, LONG = 300, 3000  # generated inputs per reader in `make test` and in `make test-slow`
COUNTS: dict[str, int] = {}


def sizes(examples: int) -> list[Any]:
    return [pytest.param(examples, id="short") if examples == SHORT else pytest.param(examples, id="long", marks=pytest.mark.slow)]


EXAMPLES = [*sizes(SHORT), *sizes(LONG)]


def fuzz(name: str, examples: int, strategy: st.SearchStrategy[bytes], read: Callable[[Path], Any], tmp: Path, suffix: str) -> None:
    """Run `read` on `examples` generated files; only DeepfitError may escape, within 5 s each."""
    path = tmp / f"input{suffix}"
    COUNTS[name] = 0

    @settings(max_examples=examples, deadline=5000, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    @given(strategy)
    def check(data: bytes) -> None:
        COUNTS[name] += 1
        path.write_bytes(data)
        tracemalloc.start()
        try:
            read(path)
        except DeepfitError:
            pass
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < 64 * len(data) + 64 * 2**20, f"{peak} bytes allocated for a {len(data)}-byte input"

    check()
    print(f"\n{name}: {COUNTS[name]} generated inputs")


# --- IDX --------------------------------------------------------------------------------------


@st.composite
def idx_files(draw: st.DrawFn) -> bytes:
    """Plausible IDX files with something wrong (or right): type byte, rank, dims, data length, gzip."""
    type_byte = draw(st.sampled_from([*IDX_TYPES, 0x00, 0x07, 0xFF]))
    ndim = draw(st.integers(0, 5))
    dims = draw(st.lists(st.one_of(st.integers(0, 6), st.integers(0, 2**32 - 1)), min_size=ndim, max_size=ndim))
    header = bytes([0, 0, type_byte, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)
    itemsize = IDX_TYPES.get(type_byte, IDX_TYPES[0x08]).itemsize
    exact = 1
    for d in dims:
        exact *= d
    length = draw(st.one_of(st.just(exact * itemsize), st.integers(0, 300))) if exact * itemsize < 10_000 else draw(st.integers(0, 300))
    data = header + draw(st.binary(min_size=length, max_size=length))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    data = data if cut is None else data[:cut]
    if draw(st.booleans()):
        data = gzip.compress(data)
        if draw(st.booleans()):  # a damaged gzip stream
            data = data[: draw(st.integers(0, len(data)))]
    return data


def read_any_idx(path: Path) -> None:
    read_idx(path)
    for reader in (read_idx_images, read_idx_labels):
        with contextlib.suppress(DeepfitError):
            reader(path)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_idx_reader(tmp_path: Path, examples: int) -> None:
    strategy = st.one_of(idx_files(), st.binary(max_size=600))
    fuzz("idx", examples, strategy, read_any_idx, tmp_path, ".idx")


# --- checkpoints ------------------------------------------------------------------------------


def valid_checkpoint_bytes(tmp: Path) -> bytes:
    state = {
        "kind": "deepfit-checkpoint", "format_version": 1, "config": {"train": {"epochs": 2}}, "classes": ["a", "b"],
        "input_shape": [1, 4, 4], "mean": [0.5], "std": [0.25],
        "model": {"w": torch.randn(2, 16), "b": torch.zeros(2)}, "rng": {"torch": torch.get_rng_state()[:64]},
    }  # fmt: skip
    save_checkpoint(state, tmp / "valid.pt")
    return (tmp / "valid.pt").read_bytes()


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """A valid checkpoint with bytes flipped, a cut, or a splice."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def zipped_pickles(draw: st.DrawFn, original: bytes) -> bytes:
    """torch's zip layout with a generated data.pkl: arbitrary pickle opcodes reach the unpickler."""
    source = zipfile.ZipFile(io.BytesIO(original))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            body = source.read(info)
            if info.filename.endswith("data.pkl"):
                body = draw(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"\x80\x02" + b + b".")))
            target.writestr(info.filename, body)
    return out.getvalue()


@pytest.mark.parametrize("examples", EXAMPLES)
def test_checkpoint_loader(tmp_path: Path, examples: int) -> None:
    original = valid_checkpoint_bytes(tmp_path)
    strategy = st.one_of(mutated(original), zipped_pickles(original), st.binary(max_size=600))
    fuzz("checkpoint", examples, strategy, load_checkpoint, tmp_path, ".pt")


# --- CSV rows and images ------------------------------------------------------------------------


def read_csv(path: Path) -> None:
    """The CSV reader with a guessed square shape, then with a declared one."""
    from deepfit.data.csv_rows import read_pixel_csv

    read_pixel_csv(path)
    read_pixel_csv(path, image_shape="1x2x2")


def decode_file(path: Path) -> None:
    """The training decoder at a fixed size, as grey and as colour."""
    from deepfit.data.decode import decode_image

    decode_image(path, channels=1, size=(8, 8))
    decode_image(path, channels=3, size=(5, 7))


@st.composite
def csv_texts(draw: st.DrawFn) -> bytes:
    """Header plus rows of label and pixel values, some wrong: ragged, non-numeric, out of range."""
    width = draw(st.integers(0, 20))
    cell = st.one_of(st.integers(-300, 300).map(str), st.sampled_from(["", "x", "1e9", "nan", "3.5", '"', "255"]))
    rows = draw(st.lists(st.lists(cell, min_size=0, max_size=width + 2), max_size=12))
    header = ",".join(["label", *[f"pixel{i}" for i in range(width)]])
    text = "\n".join([header, *(",".join(r) for r in rows)])
    return text.encode() if draw(st.booleans()) else text.encode("latin-1", "replace") + draw(st.binary(max_size=20))


@pytest.mark.parametrize("examples", EXAMPLES)
def test_csv_reader(tmp_path: Path, examples: int) -> None:
    fuzz("csv", examples, st.one_of(csv_texts(), st.binary(max_size=600)), read_csv, tmp_path, ".csv")


def image_bytes(tmp: Path) -> list[bytes]:
    from PIL import Image

    out = []
    for fmt in ("PNG", "JPEG", "BMP", "GIF"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 6), (200, 10, 30)).save(buffer, format=fmt)
        out.append(buffer.getvalue())
    return out


@pytest.mark.parametrize("examples", EXAMPLES)
def test_image_decoder(tmp_path: Path, examples: int) -> None:
    originals = image_bytes(tmp_path)
    for number, data in enumerate(originals):  # the decoders' first use imports torchvision (about 80 MB traced): not the input's doing
        (tmp_path / f"original{number}").write_bytes(data)
        decode_file(tmp_path / f"original{number}")
    strategy = st.one_of(st.sampled_from(originals).flatmap(lambda b: mutated(b)), st.binary(max_size=600))
    fuzz("image", examples, strategy, decode_file, tmp_path, ".png")


# --- inputs the fuzzer found, kept as plain regression cases ------------------------------------

FOUND = [
    ("idx", b"\x1f\x8b\x08\x00\xc0+\x06k\x02\xffc`\xe0``\x00\x00\xa5\xa61\xc8\x05\x00\x00\x00"),  # gzip read(2 GiB) preallocated
    ("idx", b'\x00\x00\x08\x03\x00\x00\x00\x00\xb5\x04\xc4\x17\xb5\x05"Q'),  # shape (0, 3e9, 3e9): numpy ValueError
    ("checkpoint", b"X\x00\x00\x00\x04"),  # file.read(n) preallocated 64 MiB
    ("checkpoint", b"\x80\x02X\xff\xff\xff\x7f"),  # a 2 GiB string declared in 7 bytes
]


@pytest.mark.parametrize(("kind", "data"), FOUND)
def test_inputs_the_fuzzer_found(tmp_path: Path, kind: str, data: bytes) -> None:
    read = read_any_idx if kind == "idx" else load_checkpoint
    fuzz(f"found-{kind}", 1, st.just(data), read, tmp_path, ".bin")
