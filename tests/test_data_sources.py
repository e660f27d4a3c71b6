"""Every data source through load_source/build_data: image folders and zips (formats, modes,
sizes, splits, class names), CSV pixel rows, IDX, CIFAR-10 batches, and the decode cache."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepfit.config import DataConfig
from deepfit.data import DATASETS, build_data, load_source
from deepfit.data.bundle import ImageSet, split_validation
from deepfit.data.cache import cache_key
from deepfit.errors import DataError
from tests.conftest import write_idx

SIZE = (12, 10)  # PIL (width, height): decoded tensors are (C, 10, 12)


def save_image(path: Path, mode: str, colour: int | tuple[int, ...], *, size: tuple[int, int] = SIZE, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **options)  # type: ignore[arg-type]
    return path


def save_grey16(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((SIZE[1], SIZE[0]), value, dtype=np.uint16)).save(path)  # mode I;16
    return path


def save_palette(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", SIZE, colour).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    return path


def save_gif(path: Path, first: tuple[int, int, int], second: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.new("RGB", SIZE, c).convert("P", palette=Image.Palette.ADAPTIVE) for c in (first, second)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return path


def noise_folder(root: Path, counts: dict[str, int], *, seed: int = 0, mode: str = "RGB") -> Path:
    """Class folders of random PNGs (lossless, so pixels can be compared exactly)."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (SIZE[1], SIZE[0], 3) if mode == "RGB" else (SIZE[1], SIZE[0])
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def zip_folder(folder: Path, path: Path, *, top: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.rglob("*")):
            name = file.relative_to(folder).as_posix()
            archive.write(file, f"{top}/{name}" if top else name)
    return path


def source_of(path: Path, **settings: object) -> object:
    return load_source(DataConfig(name=str(path), cache=False, **settings), seed=0)  # type: ignore[arg-type]


def colour_of(source: object, class_name: str) -> list[float]:
    """The mean colour of the one image of `class_name`, per channel."""
    classes, train = source.classes, source.train  # type: ignore[attr-defined]
    images = train.images[train.labels == classes.index(class_name)]
    assert len(images) == 1
    return [float(v) for v in images[0].float().mean(dim=(1, 2))]


# --- image folders ------------------------------------------------------------------------

FORMATS = {  # class folder -> (writer, expected RGB after decoding)
    "png rgb": (lambda p: save_image(p / "a.png", "RGB", (200, 30, 40)), (200, 30, 40)),
    "png rgba see-through": (lambda p: save_image(p / "a.png", "RGBA", (10, 20, 30, 0)), (255, 255, 255)),  # over white
    "png rgba opaque": (lambda p: save_image(p / "a.png", "RGBA", (10, 20, 30, 255)), (10, 20, 30)),
    "png grey": (lambda p: save_image(p / "a.png", "L", 100), (100, 100, 100)),
    "png palette": (lambda p: save_palette(p / "a.png", (0, 128, 255)), (0, 128, 255)),
    "bmp": (lambda p: save_image(p / "a.bmp", "RGB", (1, 2, 3)), (1, 2, 3)),
    "webp": (lambda p: save_image(p / "a.webp", "RGB", (50, 60, 70), lossless=True), (50, 60, 70)),
    "gif first frame": (lambda p: save_gif(p / "a.gif", (255, 0, 0), (0, 0, 255)), (255, 0, 0)),
    "jpeg": (lambda p: save_image(p / "a.jpg", "RGB", (120, 130, 140), quality=95), (120, 130, 140)),
    "café": (lambda p: save_image(p / "a.png", "RGB", (7, 8, 9)), (7, 8, 9)),
    # 16-bit grey by its top byte (30000 >> 8 = 117): PIL's convert clipped it to 255, white
    "png 16-bit grey": (lambda p: save_grey16(p / "a.png", 30000), (117, 117, 117)),
    "tiff 16-bit grey": (lambda p: save_grey16(p / "a.tif", 51400), (200, 200, 200)),
    "кошка 猫": (lambda p: save_image(p / "a.JPEG", "RGB", (90, 90, 200), quality=95), (90, 90, 200)),
}


@pytest.fixture
def format_folder(tmp_path: Path) -> Path:
    root = tmp_path / "formats"
    for name, (write, _) in FORMATS.items():
        write(root / name)
    return root


def test_every_format_and_mode_decodes_to_its_colour_and_class_names_keep_their_spelling(format_folder: Path) -> None:
    source = source_of(format_folder)
    assert source.classes == sorted(FORMATS)  # type: ignore[attr-defined]
    assert tuple(source.train.images.shape) == (len(FORMATS), 3, 10, 12)  # type: ignore[attr-defined]
    assert source.skipped == []  # type: ignore[attr-defined]
    for name, (_, expected) in FORMATS.items():
        tolerance = 3 if name in ("jpeg", "кошка 猫") else 0  # lossy
        assert colour_of(source, name) == pytest.approx(expected, abs=tolerance), name


def test_a_zip_gives_the_same_tensors_as_the_folder(format_folder: Path, tmp_path: Path) -> None:
    folder = source_of(format_folder)
    for top in (None, "photos"):  # a wrapping folder, as zips often have, is looked through
        zipped = source_of(zip_folder(format_folder, tmp_path / f"photos-{top}.zip", top=top))
        assert zipped.classes == folder.classes  # type: ignore[attr-defined]
        assert torch.equal(zipped.train.images, folder.train.images)  # type: ignore[attr-defined]
        assert torch.equal(zipped.train.labels, folder.train.labels)  # type: ignore[attr-defined]


def test_zip_names_written_without_the_utf8_flag_keep_their_letters(tmp_path: Path) -> None:
    """Many zip tools store UTF-8 names without flag bit 11; zipfile then reads them as cp437."""
    folder = tmp_path / "f"
    save_image(folder / "cafXX" / "a.png", "RGB", (1, 1, 1))  # "XX" stands in for the two bytes of "é"
    save_image(folder / "tea" / "a.png", "RGB", (2, 2, 2))
    path = zip_folder(folder, tmp_path / "names.zip")
    path.write_bytes(path.read_bytes().replace(b"cafXX", "café".encode()))
    assert not any(info.flag_bits & 0x800 for info in zipfile.ZipFile(path).infolist())
    assert source_of(path).classes == ["café", "tea"]  # type: ignore[attr-defined]


def test_default_size_is_the_most_common_one_and_image_size_resizes(tmp_path: Path) -> None:
    root = tmp_path / "sizes"
    for i in range(3):
        save_image(root / "a" / f"{i}.png", "RGB", (10, 10, 10))
    save_image(root / "b" / "big.png", "RGB", (20, 20, 20), size=(40, 40))
    save_image(root / "b" / "small.png", "RGB", (30, 30, 30), size=(12, 10))
    assert tuple(source_of(root).train.images.shape) == (5, 3, 10, 12)  # type: ignore[attr-defined]
    resized = source_of(root, image_size=8).train  # type: ignore[attr-defined]
    assert tuple(resized.images.shape) == (5, 3, 8, 8)
    assert resized.images[resized.labels == 1].float().mean() == pytest.approx(25, abs=0.5)  # solid colours stay solid


def test_grey_folders_give_one_channel_unless_asked(tmp_path: Path) -> None:
    root = noise_folder(tmp_path / "grey", {"a": 2, "b": 2}, mode="L")
    assert source_of(root).train.images.shape[1] == 1  # type: ignore[attr-defined]
    colour = source_of(root, channels=3).train.images  # type: ignore[attr-defined]
    assert colour.shape[1] == 3 and torch.equal(colour[:, 0], colour[:, 2])
    mixed = tmp_path / "mixed"
    save_image(mixed / "a" / "grey.png", "L", 100)
    save_image(mixed / "b" / "red.png", "RGB", (255, 0, 0))
    assert source_of(mixed).train.images.shape[1] == 3  # type: ignore[attr-defined]
    assert source_of(mixed, channels=1).train.images.shape[1] == 1  # type: ignore[attr-defined]


def test_train_valid_test_subtrees_are_the_splits(tmp_path: Path) -> None:
    root = tmp_path / "split"
    noise_folder(root / "train", {"a": 4, "b": 4})
    noise_folder(root / "valid", {"a": 1, "b": 1}, seed=1)
    noise_folder(root / "test", {"a": 2, "b": 3}, seed=2)
    bundle = build_data(DataConfig(name=str(root), cache=False, val_fraction=0.5), seed=0)
    assert (len(bundle.train), len(bundle.val or []), len(bundle.test or [])) == (8, 2, 5)  # valid/ is not split again
    assert bundle.test is not None and bundle.test.labels.tolist() == [0, 0, 1, 1, 1]


def test_without_subtrees_the_validation_split_is_seeded_and_stratified(tmp_path: Path) -> None:
    root = noise_folder(tmp_path / "flat", {"a": 10, "b": 20})
    config = DataConfig(name=str(root), cache=False, val_fraction=0.2)
    first, again, other = build_data(config, seed=0), build_data(config, seed=0), build_data(config, seed=1)
    assert first.val is not None and torch.bincount(first.val.labels).tolist() == [2, 4]
    assert torch.bincount(first.train.labels).tolist() == [8, 16]
    assert again.val is not None and torch.equal(first.val.images, again.val.images)
    assert other.val is not None and not torch.equal(first.val.images, other.val.images)
    tiny = build_data(DataConfig(name=str(noise_folder(tmp_path / "tiny", {"a": 3, "b": 2, "c": 1})), cache=False), seed=0)
    assert tiny.val is not None and torch.bincount(tiny.val.labels).tolist() == [1, 1]  # 10% of 3 rounds to 0: one each
    single = DataConfig(name=str(noise_folder(tmp_path / "single", {"a": 1, "b": 1})), cache=False)
    with pytest.raises(
        DataError, match=r"^the training split \(2 images\) is too small for a 10% validation split; .* --data.val-fraction 0$"
    ):
        build_data(single, seed=0)
    assert build_data(replace(single, val_fraction=0.0), seed=0).val is None  # the way out it names
    one = ImageSet(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(DataError, match=r"^the training split \(1 image\) is too small"):
        split_validation(one, 0.1, seed=0)


def test_hidden_files_and_other_extensions_are_ignored_silently(tmp_path: Path) -> None:
    root = noise_folder(tmp_path / "junk", {"a": 2, "b": 2})
    (root / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "a" / "._000.png").write_bytes(b"AppleDouble")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / "Thumbs.db").write_bytes(b"junk")
    (root / "README.md").write_text("a loose file")
    save_image(root / ".hidden" / "x.png", "RGB", (0, 0, 0))
    save_image(root / "__MACOSX" / "a" / "x.png", "RGB", (0, 0, 0))
    for path in (root, zip_folder(root, tmp_path / "junk.zip")):
        source = source_of(path)
        assert source.classes == ["a", "b"] and source.skipped == []  # type: ignore[attr-defined]
        assert len(source.train) == 4  # type: ignore[attr-defined]


def test_a_run_folder_given_as_data_is_named_as_one(tmp_path: Path) -> None:
    """Its plots/ of PNGs made a class, and checkpoints/ an empty one: it trained on its own figures."""
    run = tmp_path / "run"
    save_image(run / "plots" / "curves.png", "RGB", (0, 0, 0))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"weights")
    with pytest.raises(
        DataError, match=f"^{run} is a deepfit run folder, not images in class folders: start from its weights with --init-from"
    ):
        source_of(run)


@pytest.mark.parametrize("inside", ["run", "runs/photos-cnn_bn-1", "cat/run"])
def test_a_run_inside_the_image_folder_is_named_not_read_as_a_class(tmp_path: Path, inside: str) -> None:
    """Its plots/ made one class more: training again gained a class, and resuming it failed on a
    size mismatch of the last layer."""
    root = noise_folder(tmp_path / "photos", {"cat": 2, "dog": 2})
    run = root / inside
    save_image(run / "plots" / "curves.png", "RGB", (0, 0, 0))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best.pt").write_bytes(b"weights")
    with pytest.raises(DataError) as raised:
        source_of(root)
    assert str(raised.value) == (
        f"{run} is a deepfit run inside the image folder {root}: its plots would be read as images of a class; move it out of {root}"
    )


def test_a_run_is_not_started_inside_the_image_folder_it_trains_on(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = noise_folder(tmp_path / "photos", {"cat": 2, "dog": 2})
    inside = cli("train", "--data", "photos", "--epochs", "1", "--out", "photos/run1")
    assert inside.code == 2
    assert inside.err.strip() == (
        f"deepfit: error: the run would be written in photos/run1, inside the image folder {root} it trains on, which"
        " would then read its plots as images of a class: give an --out outside that folder"
    )
    os.chdir(root)  # no --out: runs/ would be made in the data folder
    default = cli("train", "--data", ".", "--epochs", "1")
    assert default.code == 2 and "the run would be written in runs, inside the image folder" in default.err
    assert sorted(p.name for p in root.iterdir()) == ["cat", "dog"]  # nothing written there
    os.chdir(tmp_path)
    beside = cli("train", "--data", "photos", "--epochs", "1", "--out", "photos-run", "--data.cache", "false")
    assert beside.code == 0, beside.err


def test_bad_files_are_all_listed_and_skip_bad_leaves_them_out(tmp_path: Path) -> None:
    root = noise_folder(tmp_path / "bad", {"a": 3, "b": 3})
    (root / "a" / "broken.png").write_bytes((root / "a" / "000.png").read_bytes()[:60])
    (root / "b" / "fake.jpg").write_text("hello")
    (root / "empty").mkdir()
    with pytest.raises(DataError) as caught:
        source_of(root)
    message = str(caught.value)
    assert "3 bad file(s)" in message and "--data.skip-bad" in message
    for name in ("a/broken.png", "b/fake.jpg", "empty"):
        assert f"{root / name}:" in message
    source = source_of(root, skip_bad=True)
    assert source.classes == ["a", "b"] and len(source.train) == 6  # type: ignore[attr-defined]
    assert sorted(Path(p).name for p, _ in source.skipped) == ["broken.png", "empty", "fake.jpg"]  # type: ignore[attr-defined]


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A real 1x1 PNG whose header then claims width x height (CRC fixed, so only the size lies)."""
    import zlib

    save_image(path, "RGB", (0, 0, 0), size=(1, 1))
    data = bytearray(path.read_bytes())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


def bomb_jpeg(path: Path, width: int, height: int) -> Path:
    save_image(path, "RGB", (0, 0, 0), size=(8, 8))
    data = bytearray(path.read_bytes())
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("make", [bomb_png, bomb_jpeg], ids=["png", "jpeg"])
def test_decompression_bombs_are_refused_from_the_header(make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from deepfit.data import decode

    root = noise_folder(tmp_path / "bomb", {"a": 1})
    make(root / "a" / f"bomb.{'png' if make is bomb_png else 'jpg'}", 60000, 60000)
    decoded: list[int] = []
    real = decode.decode_many
    monkeypatch.setattr(decode, "decode_many", lambda blobs, *a: decoded.append(len(blobs)) or real(blobs, *a))
    monkeypatch.setattr("deepfit.data.folder.decode_many", decode.decode_many)
    with pytest.raises(DataError, match="decompression bomb refused"):
        source_of(root)
    assert decoded == [1]  # only the good file reached the decoder


# --- CSV pixel rows and IDX ------------------------------------------------------------------


def write_csv(path: Path, labels: np.ndarray, pixels: np.ndarray, *, header: bool) -> Path:
    rows = [",".join(["label", *(f"p{i}" for i in range(pixels.shape[1]))])] if header else []
    rows += [",".join(str(int(v)) for v in (label, *row)) for label, row in zip(labels, pixels, strict=True)]
    text = "\n".join(rows) + "\n"
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def random_rows(count: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return np.arange(count) % 3, rng.integers(0, 256, size=(count, width))


@pytest.mark.parametrize(("name", "header"), [("rows.csv", True), ("rows.csv", False), ("rows.csv.gz", True), ("rows.csv.gz", False)])
def test_csv_rows_with_or_without_header_plain_or_gzip(tmp_path: Path, name: str, header: bool) -> None:
    labels, pixels = random_rows(6, 16)
    source = source_of(write_csv(tmp_path / name, labels, pixels, header=header))
    assert tuple(source.train.images.shape) == (6, 1, 4, 4)  # type: ignore[attr-defined]  # 16 values: a 4x4 square
    assert source.train.images.flatten(1).tolist() == pixels.tolist()  # type: ignore[attr-defined]
    assert source.train.labels.tolist() == labels.tolist() and source.classes == ["0", "1", "2"]  # type: ignore[attr-defined]


def test_csv_shape_is_inferred_for_colour_squares_or_given(tmp_path: Path) -> None:
    labels, pixels = random_rows(4, 48)
    path = write_csv(tmp_path / "rgb.csv", labels, pixels, header=False)
    assert tuple(source_of(path).train.images.shape) == (4, 3, 4, 4)  # type: ignore[attr-defined]
    given = source_of(path, image_shape="3x2x8").train.images  # type: ignore[attr-defined]
    assert tuple(given.shape) == (4, 3, 2, 8) and given.flatten(1).tolist() == pixels.tolist()
    labels, pixels = random_rows(4, 10)
    with pytest.raises(DataError, match=r"not a square image; pass --data\.image-shape"):
        source_of(write_csv(tmp_path / "odd.csv", labels, pixels, header=False))
    assert tuple(source_of(tmp_path / "odd.csv", image_shape="1x2x5").train.images.shape) == (4, 1, 2, 5)  # type: ignore[attr-defined]


def test_a_table_read_as_pixel_rows_names_the_target_flag_and_its_columns(tmp_path: Path) -> None:
    table = tmp_path / "houses.csv"
    table.write_text("area,rooms,city,price\n52.5,2,a,160.1\n80.0,3,b,290.7\n")
    with pytest.raises(DataError) as caught:
        source_of(table)
    assert str(caught.value) == (
        f"{table} line 2: 'a' is not a number; houses.csv was read as image rows (a label, then pixels 0-255):"
        " for a table, name the column to predict with --target COLUMN (columns: area, rooms, city, price)"
    )
    labels, pixels = random_rows(4, 10)
    for header in (False, True):  # pixel rows, headed by `label` or not headed: no table hint
        with pytest.raises(DataError) as caught:
            source_of(write_csv(tmp_path / "odd.csv", labels, pixels, header=header))
        assert "--target" not in str(caught.value)


@pytest.mark.parametrize("name", ["label", "Class", "y"])
def test_a_header_that_names_the_label_column_elsewhere_is_read_by_it(tmp_path: Path, name: str) -> None:
    """'pixel0,...,pixel15,label': the first pixel was read as the label, 253 classes of them."""
    labels, pixels = random_rows(6, 16)
    path = tmp_path / "last.csv"
    rows = [",".join([*(f"pixel{i}" for i in range(16)), name])]
    path.write_text("\n".join(rows + [",".join(map(str, (*row, label))) for label, row in zip(labels, pixels, strict=True)]) + "\n")
    source = source_of(path)
    assert source.classes == ["0", "1", "2"] and source.train.labels.tolist() == labels.tolist()  # type: ignore[attr-defined]
    assert source.train.images.flatten(1).tolist() == pixels.tolist()  # type: ignore[attr-defined]


def test_a_header_of_pixels_alone_is_refused_for_training_and_read_for_prediction(tmp_path: Path) -> None:
    labels, pixels = random_rows(6, 16)
    path = tmp_path / "digit.csv"  # the label column named otherwise: pixel0 was the label
    path.write_text(
        "\n".join(
            [
                ",".join([*(f"pixel{i}" for i in range(16)), "digit"]),
                *(",".join(map(str, (*r, label))) for label, r in zip(labels, pixels, strict=True)),
            ]
        )
    )
    with pytest.raises(DataError) as caught:
        source_of(path)
    assert str(caught.value) == (
        f"{path}: the header names no label column and its first column, pixel0, is a pixel; name the column of class"
        " numbers label (or labels, class, target, y)"
    )
    unlabelled = tmp_path / "pixels.csv"
    unlabelled.write_text("\n".join([",".join(f"pixel{i}" for i in range(16)), *(",".join(map(str, r)) for r in pixels)]))
    from deepfit.data.csv_rows import read_pixel_csv

    read = read_pixel_csv(unlabelled, image_shape="1x4x4", unlabelled_ok=True)
    assert read.images.flatten(1).tolist() == pixels.tolist()


def test_a_train_csv_finds_its_test_sibling(tmp_path: Path) -> None:
    write_csv(tmp_path / "digits_train.csv", *random_rows(6, 16), header=True)
    write_csv(tmp_path / "digits_test.csv", *random_rows(3, 16, seed=1), header=True)
    source = source_of(tmp_path / "digits_train.csv")
    assert len(source.train) == 6 and source.test is not None and len(source.test) == 3  # type: ignore[attr-defined]


def test_the_same_data_as_csv_and_as_idx_gives_identical_tensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    folder = tmp_path / "idx"
    folder.mkdir()
    for prefix, count, csv_name in (("train", 30, "mnist_train.csv"), ("t10k", 10, "mnist_test.csv")):
        images = rng.integers(0, 256, size=(count, 6, 6), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
        write_csv(tmp_path / csv_name, labels, images.reshape(count, -1), header=True)
    idx = load_source(DataConfig(name="mnist", dir=str(folder), cache=False), seed=0)
    csv = source_of(tmp_path / "mnist_train.csv")
    assert idx.classes == csv.classes  # type: ignore[attr-defined]
    for split in ("train", "test"):
        a, b = getattr(idx, split), getattr(csv, split)
        assert a.images.dtype == b.images.dtype == torch.uint8
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def bad_idx_files(folder: Path) -> Path:
    folder.mkdir()
    write_idx(folder / "short", np.zeros((3, 4, 4), np.uint8))
    (folder / "short").write_bytes((folder / "short").read_bytes()[:-5])
    (folder / "magic").write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    return folder


def test_idx_errors_are_reported_by_the_reader_compiled_as_python_O_compiles_it(tmp_path: Path) -> None:
    """The checks are not asserts: -O strips those. Here idx.py is compiled with optimize=2 (what
    `python -O[O]` does) into a fresh module; the slow test below runs a real `python -O`."""
    import types

    import deepfit.data.idx as idx

    optimized = types.ModuleType("idx_optimized")
    exec(compile(Path(idx.__file__).read_text(), idx.__file__, "exec", optimize=2), optimized.__dict__)
    folder = bad_idx_files(tmp_path / "idx")
    with pytest.raises(DataError, match=r"IDX header declares shape \(3, 4, 4\) \(48 bytes\) but the file holds 43 bytes"):
        optimized.read_idx(folder / "short")
    with pytest.raises(DataError, match="wrong magic number 12340801"):
        optimized.read_idx(folder / "magic")


@pytest.mark.slow
def test_idx_errors_are_reported_also_under_python_O(tmp_path: Path) -> None:
    folder = bad_idx_files(tmp_path / "idx")
    script = (
        "import sys\nfrom pathlib import Path\nfrom deepfit.data.idx import read_idx\nfrom deepfit.errors import DataError\n"
        "assert False, 'asserts must be off'\n"
        "for name in ('short', 'magic'):\n"
        "    try:\n        read_idx(Path(sys.argv[1]) / name)\n    except DataError as err:\n        print(err)\n"
    )
    proc = subprocess.run([sys.executable, "-O", "-c", script, str(folder)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    short, magic = proc.stdout.strip().splitlines()
    assert "IDX header declares shape (3, 4, 4) (48 bytes) but the file holds 43 bytes" in short
    assert "wrong magic number 12340801" in magic


# --- CIFAR-10 batches ------------------------------------------------------------------------


def write_cifar_batches(folder: Path, per_batch: int = 4, test: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's cifar-10-batches-py layout: pickled dicts with 'data' (N, 3072) uint8 rows in
    CHW order and 'labels'. Returns all train images (N, 3, 32, 32) then the test ones."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    batches = []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=count)]
        with (folder / name).open("wb") as handle:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(count)]}, handle)
        batches.append(data.reshape(-1, 3, 32, 32))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return np.concatenate(batches[:5]), batches[5]


def test_cifar10_batches_from_data_dir_and_from_the_datasets_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, test = write_cifar_batches(tmp_path / "root" / "cifar-10-batches-py")
    source = load_source(DataConfig(name="cifar10", dir=str(tmp_path / "root"), cache=False), seed=0)
    assert "cifar10" in DATASETS and source.classes[:3] == ["airplane", "automobile", "bird"] and source.flip_ok
    assert torch.equal(source.train.images, torch.from_numpy(train)) and source.test is not None
    assert torch.equal(source.test.images, torch.from_numpy(test))
    monkeypatch.setenv("DEEPFIT_DATASETS", str(tmp_path / "datasets"))
    shutil.copytree(tmp_path / "root", tmp_path / "datasets" / "cifar10")
    found = load_source(DataConfig(name="cifar10", cache=False), seed=0)
    assert torch.equal(found.train.images, source.train.images)


def test_cifar10_not_found_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPFIT_DATASETS", str(tmp_path))
    with pytest.raises(DataError, match=r"cifar10 .* not found .*--download"):
        load_source(DataConfig(name="cifar10", cache=False), seed=0)


# --- settings that apply to every source -----------------------------------------------------


def test_channels_and_image_size_apply_to_named_datasets_too(tiny_idx: Path) -> None:
    plain = build_data(DataConfig(name="mnist", dir=str(tiny_idx), cache=False))
    fitted = build_data(DataConfig(name="mnist", dir=str(tiny_idx), cache=False, channels=3, image_size=16))
    assert fitted.input_shape == (3, 16, 16) and fitted.test is not None and fitted.test.images.shape[1:] == (3, 16, 16)
    assert torch.equal(fitted.train.images[:, 0], fitted.train.images[:, 2])  # grey repeated
    assert float(fitted.train.images.float().mean()) == pytest.approx(float(plain.train.images.float().mean()), rel=0.05)


def test_unknown_sources_list_the_registered_names(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_source(DataConfig(name="imagenet-42"), seed=0)
    assert "unknown dataset 'imagenet-42'" in str(caught.value)
    assert all(name in str(caught.value) for name in DATASETS.names())
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"neither a folder nor a \.zip, \.csv or \.csv\.gz"):
        load_source(DataConfig(name=str(tmp_path / "notes.txt")), seed=0)


# --- the decode cache -------------------------------------------------------------------------


def cached(path: Path, cache_dir: Path, **settings: object) -> object:
    return load_source(DataConfig(name=str(path), cache_dir=str(cache_dir), **settings), seed=0)  # type: ignore[arg-type]


def refuse_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr("deepfit.data.paths.load_folder_source", fail)
    monkeypatch.setattr("deepfit.data.paths.load_csv_source", fail)


def test_the_second_load_comes_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = noise_folder(tmp_path / "photos", {"a": 3, "b": 2})
    first = cached(root, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1
    refuse_decoding(monkeypatch)
    again = cached(root, tmp_path / "cache")
    assert torch.equal(again.train.images, first.train.images) and again.classes == first.classes  # type: ignore[attr-defined]


def test_the_cache_key_changes_with_files_settings_and_place(tmp_path: Path) -> None:
    root = noise_folder(tmp_path / "photos", {"a": 3, "b": 2})
    cache = tmp_path / "cache"
    before = cached(root, cache).train.images  # type: ignore[attr-defined]
    file = root / "a" / "001.png"
    save_image(file, "RGB", (0, 255, 0))
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))
    after = cached(root, cache).train.images  # type: ignore[attr-defined]
    assert not torch.equal(before, after) and after[1].float().mean(dim=(1, 2)).tolist() == [0.0, 255.0, 0.0]
    save_image(root / "b" / "new.png", "RGB", (1, 2, 3))  # a file added
    assert len(cached(root, cache).train) == 6  # type: ignore[attr-defined]
    cached(root, cache, image_size=8)
    cached(root, cache, channels=1)
    shutil.copytree(root, tmp_path / "copy")
    cached(tmp_path / "copy", cache)
    assert len(list(cache.iterdir())) == 6  # one file per (files, settings, place)
    keys = {cache_key("folder", [("a", 1, 2)], {"s": 1}), cache_key("folder", [("a", 1, 3)], {"s": 1})}
    keys |= {cache_key("folder", [("a", 1, 2)], {"s": 2}), cache_key("csv", [("a", 1, 2)], {"s": 1})}
    assert len(keys) == 4


def test_a_changed_zip_is_decoded_again(tmp_path: Path) -> None:
    root = noise_folder(tmp_path / "photos", {"a": 2, "b": 2})
    path = zip_folder(root, tmp_path / "photos.zip")
    first = cached(path, tmp_path / "cache").train.images  # type: ignore[attr-defined]
    save_image(root / "a" / "000.png", "RGB", (0, 0, 255))
    zip_folder(root, path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    second = cached(path, tmp_path / "cache").train.images  # type: ignore[attr-defined]
    assert not torch.equal(first, second) and second[0].float().mean(dim=(1, 2)).tolist() == [0.0, 0.0, 255.0]


def test_a_changed_csv_is_decoded_again(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "rows.csv", *random_rows(4, 16), header=False)
    first = cached(path, tmp_path / "cache").train.images  # type: ignore[attr-defined]
    labels, pixels = random_rows(4, 16, seed=9)
    write_csv(path, labels, pixels, header=False)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    second = cached(path, tmp_path / "cache").train.images  # type: ignore[attr-defined]
    assert not torch.equal(first, second) and second.flatten(1).tolist() == pixels.tolist()
    assert len(cached(path, tmp_path / "cache", image_shape="1x2x8").train.images.shape) == 4  # type: ignore[attr-defined]
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_bad_files_are_reported_from_the_cache_too_and_cache_off_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = noise_folder(tmp_path / "photos", {"a": 2, "b": 2})
    (root / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert len(cached(root, tmp_path / "cache", skip_bad=True).skipped) == 1  # type: ignore[attr-defined]
    refuse_decoding(monkeypatch)
    with pytest.raises(DataError, match="1 bad file"):
        cached(root, tmp_path / "cache")
    monkeypatch.undo()
    cached(root, tmp_path / "nocache", skip_bad=True, cache=False)
    assert not (tmp_path / "nocache").exists()


def test_an_unreadable_cache_file_is_rebuilt(tmp_path: Path) -> None:
    root = noise_folder(tmp_path / "photos", {"a": 2, "b": 2})
    first = cached(root, tmp_path / "cache").train.images  # type: ignore[attr-defined]
    (entry,) = (tmp_path / "cache").iterdir()
    entry.write_bytes(b"garbage")
    assert torch.equal(cached(root, tmp_path / "cache").train.images, first)  # type: ignore[attr-defined]
    assert entry.stat().st_size > 100  # written again


def test_named_datasets_are_cached_and_follow_their_files(tiny_idx: Path, tmp_path: Path) -> None:
    config = DataConfig(name="mnist", dir=str(tiny_idx), cache_dir=str(tmp_path / "cache"))
    first = load_source(config, seed=0)
    again = load_source(config, seed=0)
    assert torch.equal(first.train.images, again.train.images)
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()] == ["mnist"]
    labels = tiny_idx / "train-labels-idx1-ubyte.gz"
    write_idx(tiny_idx / "train-labels-idx1-ubyte", (np.arange(120) % 2).astype(np.uint8), compress=True)
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))
    assert load_source(config, seed=0).train.labels.max() == 1


def test_a_named_dataset_too_big_once_resized_stops_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepfit.data.bundle

    monkeypatch.setattr(deepfit.data.bundle, "device_memory", lambda device: 10 * 2**20)  # a machine of 10 MiB
    with pytest.raises(DataError) as caught:
        build_data(DataConfig(name="digits", image_size=64), seed=0)
    assert "1,797 images resized to 64x64 take 0.0 GB in memory, over half of this machine's 0.0 GB" in str(caught.value)
    monkeypatch.setattr(deepfit.data.bundle, "device_memory", lambda device: 64 * 2**30)
    assert tuple(build_data(DataConfig(name="digits", image_size=64), seed=0).train.images.shape[1:]) == (1, 64, 64)  # type: ignore[attr-defined]
