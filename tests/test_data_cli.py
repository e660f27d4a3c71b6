"""The data sources through the command line: every bad input stops `deepfit train` with exit
code 2 and a clear message before any run folder exists; --data.skip-bad; `deepfit data info|show`."""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from deepfit.checkpoint import load_checkpoint
from tests.conftest import write_tiny_idx
from tests.test_data_sources import bomb_png, noise_folder, save_image, write_csv


def jpeg_bytes(colour: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def photos(tmp: Path) -> Path:
    return noise_folder(tmp / "photos", {"big cats": 4, "dogs": 4})


def with_file(name: str, data: Callable[[Path], bytes]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        root = photos(tmp)
        (root / name).write_bytes(data(root))
        return root

    return make


def empty_class(tmp: Path) -> Path:
    root = photos(tmp)
    (root / "birds").mkdir()
    (root / "birds" / ".DS_Store").write_bytes(b"hidden files do not count")
    return root


def with_bomb(tmp: Path) -> Path:
    root = photos(tmp)
    bomb_png(root / "dogs" / "bomb.png", 40000, 40000)
    return root


def csv_lines(*lines: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / "rows.csv"
        path.write_text("\n".join(lines) + "\n")
        return path

    return make


def idx_folder(corrupt: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        folder = write_tiny_idx(tmp / "idx", compress=False)
        path = folder / "train-images-idx3-ubyte"
        path.write_bytes(corrupt(path.read_bytes()))
        return folder

    return make


def not_data(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("x")
    return tmp / "notes.txt"


def broken_zip(tmp: Path) -> Path:
    (tmp / "photos.zip").write_bytes(b"PK\x03\x04 not really a zip")
    return tmp / "photos.zip"


def no_classes(tmp: Path) -> Path:
    save_image(tmp / "loose" / "a.png", "RGB", (1, 2, 3))
    return tmp / "loose"


# case -> (make the source, extra args, what the message says)
BAD_FILES = {
    "truncated jpeg": (with_file("dogs/cut.jpg", lambda r: jpeg_bytes()[:300]), "dogs/cut.jpg: corrupt or truncated image"),
    "truncated png": (
        with_file("dogs/cut.png", lambda r: (r / "dogs" / "000.png").read_bytes()[:200]),
        "dogs/cut.png: corrupt or truncated image",
    ),
    "not an image": (with_file("dogs/fake.png", lambda r: b"just text"), "dogs/fake.png: not an image"),
    "empty class folder": (empty_class, "birds: empty class folder"),
    "decompression bomb": (with_bomb, "dogs/bomb.png: decompression bomb refused"),
}
BAD_SOURCES = {
    "csv wrong count": (csv_lines("label,a,b,c,d", "0,1,2,3,4", "1,1,2,3"), [], "rows.csv line 3: 4 values, expected 5"),
    "csv not a number": (csv_lines("0,1,2,3,4", "1,1,x,3,4"), [], "rows.csv line 2: 'x' is not a number"),
    "csv out of range": (csv_lines("0,1,2,3,4", "1,1,2,256,4"), [], "line 2: pixel 3 = 256 is not a whole number in 0-255"),
    "csv shape mismatch": (csv_lines("0,1,2,3,4"), ["--data.image-shape", "1x3x3"], "line 1: 5 values, expected 10"),
    "idx wrong magic": (idx_folder(lambda b: b"\x01\x02" + b[2:]), ["--data", "mnist"], "wrong magic number"),
    "idx size mismatch": (idx_folder(lambda b: b[:-9]), ["--data", "mnist"], "IDX header declares shape"),
    "missing path": (lambda tmp: tmp / "imagenet-42", [], "imagenet-42 (moved or deleted?); a run whose data moved takes its new place"),
    "not a data file": (not_data, [], "neither a folder nor a .zip, .csv or .csv.gz"),
    "broken zip": (broken_zip, [], "is not a readable zip file"),
    "no class folders": (no_classes, [], "has no class folders with images"),
    "image size past the bomb limit": (photos, ["--data.image-size", "100000"], "data.image_size 100000 is over the decoded-image limit"),
    "image size zero": (photos, ["--data.image-size", "0"], "data.image_size must be a positive number of pixels"),
    "one class folder": (
        lambda tmp: noise_folder(tmp / "cats-only", {"cats": 4}),
        [],
        "one class (cats) to train on; a classifier needs at least 2",
    ),
    "one label value": (csv_lines("3,1,2,3,4", "3,5,6,7,8"), [], "the first column, read as the label, is 3 in every row; is the label in"),
    # no header and the label last: the first pixel read as labels, more classes than rows
    "csv label last": (
        csv_lines("200,1,2,3,1", "17,5,6,7,0", "0,5,6,7,2"),
        [],
        "the first column, read as the label, runs 0..200 (201 classes) over 3 rows",
    ),
}


def train_args(source: Path, extra: list[str], out: Path) -> list[str]:
    data = ["--data-dir", str(source)] if "--data" in extra else ["--data", str(source)]
    return ["train", *data, *extra, "--model", "mlp", "--epochs", "1", "--out", str(out), "--no-progress"]


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_image_files_are_listed_and_stop_before_the_run_folder(cli, tmp_path: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    make, needle = BAD_FILES[case]
    root = make(tmp_path)
    result = cli(*train_args(root, [], tmp_path / "run"))
    assert result.code == 2 and "Traceback" not in result.err
    summary, *listed = result.err.strip().splitlines()
    assert summary.startswith(f"deepfit: error: {root}: 1 bad file(s)") and "--data.skip-bad true" in summary
    assert len(listed) == 1 and listed[0].strip().startswith(f"{root}/{needle}")
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_every_bad_file_is_listed_at_once(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = empty_class(tmp_path)
    (root / "dogs" / "fake.jpg").write_bytes(b"nope")
    (root / "big cats" / "cut.jpg").write_bytes(jpeg_bytes()[:300])
    result = cli(*train_args(root, [], tmp_path / "run"))
    lines = result.err.strip().splitlines()
    assert result.code == 2 and "3 bad file(s)" in lines[0] and len(lines) == 4
    assert {Path(line.split(": ")[0].strip()).name for line in lines[1:]} == {"birds", "fake.jpg", "cut.jpg"}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_sources_are_one_line_exit_2_and_no_run_folder(cli, tmp_path: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    make, extra, needle = BAD_SOURCES[case]
    result = cli(*train_args(make(tmp_path), extra, tmp_path / "run"))
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepfit: error:") and needle in lines[0], result.err
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_skip_bad_trains_without_them_and_writes_the_list(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = empty_class(tmp_path)
    (root / "dogs" / "fake.jpg").write_bytes(b"nope")
    result = cli(*train_args(root, ["--data.skip-bad", "true", "--data.image-size", "8"], tmp_path / "run"))
    assert result.code == 0, result.err
    listed = tmp_path / "run" / "skipped_files.csv"
    assert f"skipped 2 bad file(s), listed in {listed}" in result.out
    rows = list(csv.DictReader(listed.open(encoding="utf-8")))
    assert {(Path(r["path"]).name, r["reason"].split(" (")[0]) for r in rows} == {
        ("birds", "empty class folder: no readable images"),
        ("fake.jpg", "not an image"),
    }
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["classes"] == ["big cats", "dogs"] and state["input_shape"] == [3, 8, 8]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["skip_bad"] is True


def test_train_from_a_zip_keeps_class_names_in_the_checkpoint(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = noise_folder(tmp_path / "photos", {"chat noir": 3, "château": 3, "собака": 3})
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(root.rglob("*.png")):
            archive.write(file, "photos/" + file.relative_to(root).as_posix())
    result = cli(*train_args(path, [], tmp_path / "run"))
    assert result.code == 0, result.err
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["classes"] == ["chat noir", "château", "собака"]


def test_fit_takes_a_path_as_data_name(tmp_path: Path) -> None:
    import deepfit
    from deepfit.config import Config

    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    pixels = rng.integers(0, 60, size=(60, 36))
    pixels[np.arange(60), labels * 12] = 255  # learnable: the class sets a bright pixel
    config = Config()
    config.data.name = str(write_csv(tmp_path / "rows.csv.gz", labels, pixels, header=False))
    config.model.name, config.train.epochs, config.train.progress, config.train.out = "mlp", 2, False, str(tmp_path / "run")
    result = deepfit.fit(config)
    assert result.data.input_shape == (1, 6, 6) and result.data.classes == ["0", "1", "2"]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


# --- deepfit data info | show -------------------------------------------------------------------


def test_data_info_describes_a_folder(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = noise_folder(tmp_path / "photos", {"big cats": 5, "dogs": 3})
    result = cli("data", "info", str(root), "--data.val-fraction", "0")
    assert result.code == 0, result.err
    assert f"found at: {root}" in result.out and "image shape: 3x10x12" in result.out and "2 classes" in result.out
    assert "splits: train 8" in result.out
    assert re.search(r"big cats\s+5\n", result.out) and re.search(r"dogs\s+3", result.out)
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted(root.rglob("*.png"))]) / 255.0  # (N, H, W, 3)
    mean = re.search(r"channel mean: (.*) \(", result.out)
    std = re.search(r"channel std: (.*)", result.out)
    assert mean and [float(v) for v in mean.group(1).split(", ")] == pytest.approx(pixels.mean(axis=(0, 1, 2)), abs=1e-4)
    assert std and [float(v) for v in std.group(1).split(", ")] == pytest.approx(pixels.std(axis=(0, 1, 2)), abs=1e-4)


@pytest.mark.parametrize("pipeline", ["memory", "stream"])
def test_data_info_says_which_sizes_were_resized(cli, tmp_path: Path, pipeline: str) -> None:  # type: ignore[no-untyped-def]
    root = noise_folder(tmp_path / "photos", {"cats": 4, "dogs": 3})  # 10x12 (HxW)
    uniform = cli("data", "info", str(root), "--data.pipeline", pipeline)
    assert uniform.code == 0 and "sizes found" not in uniform.out and "image shape: 3x10x12" in uniform.out
    for i, size in enumerate([(20, 16), (20, 16), (7, 9)]):  # (width, height)
        Image.new("RGB", size, (i, 0, 0)).save(root / "dogs" / f"other{i}.png")
    for _ in range(2):  # built, then read back from the cache (the memory pipeline)
        mixed = cli("data", "info", str(root), "--data.pipeline", pipeline)
        assert mixed.code == 0, mixed.err
        assert "image shape: 3x10x12" in mixed.out
        assert "sizes found: 10x12 (7), 16x20 (2), 9x7 (1); 3 image(s) resized to 10x12 (--data.image-size N to choose)" in mixed.out
    chosen = cli("data", "info", str(root), "--data.pipeline", pipeline, "--data.image-size", "16")
    assert "sizes found: 10x12 (7), 16x20 (2), 9x7 (1); 10 image(s) resized to 16x16" in chosen.out
    trained = cli("train", "--data", str(root), "--data.pipeline", pipeline, "--epochs", "1", "--no-progress", "--out", "run")
    assert trained.code == 0, trained.err
    assert (
        "10 images 3x10x12 (train / val / test 8 / 2 / 0), 2 classes; 3 resized to 10x12 (deepfit data info lists the sizes)" in trained.out
    )


def test_data_info_takes_the_train_data_flags(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = write_tiny_idx(tmp_path / "idx")
    result = cli("data", "info", "mnist", "--data-dir", str(folder), "--data.image-size", "16", "--data.channels", "3")
    assert result.code == 0, result.err
    assert "image shape: 3x16x16" in result.out and "splits: train 110, val 10, test 40" in result.out
    path = write_csv(tmp_path / "rows.csv", np.arange(4) % 2, np.zeros((4, 12), int), header=False)
    result = cli("data", "info", str(path), "--data.image-shape", "1x3x4")
    assert result.code == 0 and "image shape: 1x3x4" in result.out
    skipped = empty_class(tmp_path)
    result = cli("data", "info", str(skipped), "--data.skip-bad", "true")
    assert result.code == 1 and "1 bad file(s), not counted above:" in result.out and "birds: empty class folder" in result.out


def test_data_info_describes_the_readable_images_and_lists_the_bad_ones(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = noise_folder(tmp_path / "photos", {"cats": 4, "dogs": 3})
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = cli("data", "info", str(root), "--data.val-fraction", "0")
    assert result.code == 1, result.err  # 1: described, but not everything was readable
    assert "splits: train 7" in result.out and re.search(r"dogs\s+3\n", result.out)
    assert "1 bad file(s), not counted above:" in result.out and "broken.png" in result.out
    assert "skip-bad" not in result.out + result.err and "train without" not in result.out + result.err
    assert cli("train", str(root), "--epochs", "1").code == 2  # training keeps its rule: stop unless --data.skip-bad true


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["data", "info", "imagenet-42"], "unknown dataset"),
        (["data", "info", "digits", "--optim.lr", "1"], "takes only --data.* settings"),
        (["data", "show", "digits", "--count", "0"], "--count must be at least 1"),
        (["data", "list", "digits"], "invalid choice"),
        (["data", "show", "digits", "--out", "grid.foo"], "--out grid.foo: a figure is written as *.eps, "),  # was a traceback
    ],
)
def test_data_command_errors_are_one_line(cli, args: list[str], needle: str) -> None:  # type: ignore[no-untyped-def]
    result = cli(*args)
    lines = result.err.strip().splitlines()
    assert result.code == 2 and len(lines) == 1 and needle in lines[0], result.err


def test_data_show_writes_a_png_grid_and_prints_its_path(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = noise_folder(tmp_path / "photos", {"big cats": 5, "dogs": 3})
    result = cli("data", "show", str(root), "--count", "6", "--out", str(tmp_path / "grid.png"))
    assert result.code == 0, result.err
    assert result.out.strip() == str(tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as image:
        assert image.format == "PNG" and image.width > 300
    default = cli("data", "show", "digits")
    assert default.code == 0 and (tmp_path / "digits-samples.png").is_file()  # cli runs in tmp_path


def test_plot_samples_titles_each_panel_with_its_class() -> None:
    from deepfit.plots import plot_samples

    images = np.zeros((3, 1, 4, 4), np.uint8)
    figure = plot_samples(images, np.array([2, 0, 2]), ["zéro", "one", "two words"], title="t")
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == ["two words", "zéro", "two words"] and figure._suptitle is not None and figure._suptitle.get_text() == "t"


# --- the real CIFAR-10 JPEG zip --------------------------------------------------------------


@pytest.mark.data
def test_the_cifar10_zip_is_listed_without_unpacking(cifar_zip: Path) -> None:
    from deepfit.data.folder import list_files, plan_layout

    layout = plan_layout(list_files(cifar_zip))
    assert {split: len(files) for split, files in layout.splits.items()} == {"train": 50000, "test": 10000}
    assert len({name for _, name in layout.splits["train"]}) == 10


@pytest.mark.data
@pytest.mark.slow
def test_data_info_on_the_cifar10_zip(cli, cifar_zip: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("data", "info", str(cifar_zip))
    assert result.code == 0, result.err
    assert "image shape: 3x32x32" in result.out and "10 classes" in result.out
    assert "splits: train 45,000, val 5,000, test 10,000" in result.out and re.search(r"airplane\s+4,500\s+500\s+1,000", result.out)
    again = cli("data", "info", str(cifar_zip))  # from the cache
    assert again.out == result.out


def test_relative_data_paths_are_saved_absolute_so_evaluate_works_from_elsewhere(cli, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    noise_folder(tmp_path / "photos", {"cats": 6, "dogs": 6})
    write_tiny_idx(tmp_path / "idx")
    assert cli(*train_args(Path("photos"), [], Path("run"))).code == 0
    code = cli("train", "--data", "mnist", "--data-dir", "idx", "--model", "mlp", "--epochs", "1", "--out", "run-idx", "--no-progress").code
    assert code == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert saved["name"] == str((tmp_path / "photos").resolve())
    assert yaml.safe_load((tmp_path / "run-idx" / "config.yaml").read_text())["data"]["dir"] == str((tmp_path / "idx").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli("evaluate", str(tmp_path / "run"), "--split", "val").code == 0
    assert cli("evaluate", str(tmp_path / "run-idx")).code == 0


@pytest.mark.parametrize("pipeline", ["memory", "stream"])
def test_evaluate_stops_on_bad_files_and_skip_bad_leaves_them_out(cli, tmp_path: Path, pipeline: str) -> None:  # type: ignore[no-untyped-def]
    for split, count in (("train", 6), ("test", 3)):
        noise_folder(tmp_path / "clean" / split, {"cats": count, "dogs": count}, seed=len(split))
    assert cli(*train_args(tmp_path / "clean", ["--data.pipeline", pipeline], tmp_path / "run")).code == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    for split in ("train", "test"):
        noise_folder(broken / split, {"cats": 3, "dogs": 3}, seed=len(split))
    (broken / "test" / "dogs" / "cut.jpg").write_bytes(jpeg_bytes()[:300])  # a JPEG header: streaming finds it when decoding
    (broken / "train" / "cats" / "fake.png").write_bytes(b"nope")
    stopped = cli("evaluate", str(tmp_path / "run"), "--data", str(broken))
    assert stopped.code == 2 and "Traceback" not in stopped.err
    assert "fake.png" in stopped.err and "deepfit evaluate --skip-bad" in stopped.err
    assert not list((tmp_path / "run").glob("report*.json"))
    result = cli("evaluate", str(tmp_path / "run"), "--data", str(broken), "--skip-bad")
    assert result.code == 0, result.err
    assert f"{broken} test split: 6 images" in result.out  # 7 files, the cut one left out
    assert json.loads((tmp_path / "run" / "report-data-broken.json").read_text())["images"] == 6
    assert re.search(r"fake\.png: not an image", result.out) and "cut.jpg" in result.out + result.err
