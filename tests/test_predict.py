"""`deepfit predict` and `Predictor`: every input kind gives what a hand-rebuilt model gives on the
same pixels, files of any mode and size are converted like training data, the folder/glob/CSV
CLI agrees with `evaluate` image by image, and unreadable files fail alone (exit code 1)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepfit.cli import main
from deepfit.evaluation import evaluate_checkpoint
from deepfit.predict import PredictError, Prediction, Predictor, decode
from tests.conftest import write_tiny_idx
from tests.test_evaluate import reference_logits

SIDE = 12  # the tiny dataset's image side


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    data = write_tiny_idx(root / "idx", train=200, test=60, side=SIDE, seed=5)
    args = ["train", "--data", "mnist", "--data-dir", str(data), "--epochs", "1", "--no-progress", "--model", "lenet"]
    assert main([*args, "--data.batch-size", "16", "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def predictor(tiny_run: Path) -> Predictor:
    return Predictor.from_checkpoint(tiny_run / "checkpoints" / "best.pt")


def tiny_test_images(tiny_run: Path) -> np.ndarray:
    raw = gzip.decompress((tiny_run.parent / "idx" / "t10k-images-idx3-ubyte.gz").read_bytes())
    return np.frombuffer(raw[16:], dtype=np.uint8).reshape(-1, SIDE, SIDE).copy()


def expected(tiny_run: Path, images: np.ndarray) -> torch.Tensor:
    """Softmax of the hand-rebuilt model on uint8 (N, H, W) images."""
    logits = reference_logits(tiny_run / "checkpoints" / "best.pt", torch.from_numpy(images).unsqueeze(1))
    return torch.softmax(logits, dim=1)


def check(prediction: Prediction, probabilities: torch.Tensor, classes: list[str], k: int = 5) -> None:
    index = int(probabilities.argmax())
    assert prediction.index == index and prediction.label == classes[index]
    assert prediction.probability == pytest.approx(float(probabilities[index]), abs=1e-5)
    order = probabilities.argsort(descending=True)[:k]
    assert [label for label, _ in prediction.topk] == [classes[int(i)] for i in order]
    assert [p for _, p in prediction.topk] == pytest.approx([float(probabilities[i]) for i in order], abs=1e-5)


def test_every_input_kind_matches_a_hand_rebuilt_model(tiny_run: Path, predictor: Predictor, tmp_path: Path) -> None:
    images = tiny_test_images(tiny_run)[:6]
    probabilities = expected(tiny_run, images)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image, mode="L").save(paths[-1])
    kinds = {
        "path str": [str(p) for p in paths],
        "Path": paths,
        "PIL": [Image.fromarray(image, mode="L") for image in images],
        "numpy HW": list(images),
        "numpy HWC": [image[:, :, None] for image in images],
        "tensor CHW": [torch.from_numpy(image).unsqueeze(0) for image in images],
        "float tensor 0..1": [torch.from_numpy(image).float().div(255).unsqueeze(0) for image in images],
        "numpy batch NHWC": images[:, :, :, None],
        "tensor batch NCHW": torch.from_numpy(images).unsqueeze(1),
    }
    for kind, inputs in kinds.items():
        results = predictor.predict(inputs)
        assert len(results) == len(images), kind
        for result, probs in zip(results, probabilities, strict=True):
            check(result, probs, predictor.classes)
    assert predictor.predict(str(paths[0]))[0].path == str(paths[0])
    assert predictor.predict(images[0])[0].path is None


def test_any_mode_and_size_is_converted_like_the_decoder(tiny_run: Path, predictor: Predictor, tmp_path: Path) -> None:
    """An RGB, RGBA, palette or 16-bit image of another size goes through the decoder: same
    prediction as the model on the decoder's output, which is close to a plain PIL conversion."""
    gray = Image.fromarray(tiny_test_images(tiny_run)[0], mode="L").resize((40, 30), Image.Resampling.NEAREST)
    variants = {
        "RGB": gray.convert("RGB"),
        "RGBA": gray.convert("RGBA"),
        "P": gray.convert("RGB").convert("P"),
        "I;16": Image.fromarray(np.asarray(gray).astype(np.uint16) * 257),  # 16-bit: 0..65535, read by its top byte
        "1": gray.convert("1"),
    }
    for mode, image in variants.items():
        path = tmp_path / f"{mode.replace(';', '')}.png"
        image.save(path)
        pixels = decode(path, channels=1, size=(SIDE, SIDE))
        assert tuple(pixels.shape) == (1, SIDE, SIDE) and pixels.dtype == torch.uint8, mode
        plain = np.asarray(gray.resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.float64)
        assert np.abs(pixels[0].numpy() - plain).mean() < 12, mode  # same picture (decoders may antialias)
        probabilities = expected(tiny_run, pixels.numpy())[0]
        check(predictor.predict(path)[0], probabilities, predictor.classes)
        check(predictor.predict(image)[0], probabilities, predictor.classes)
        if mode == "I;16":  # the same pixels as OpenCV's 16-bit read gives them: they were clipped, white
            check(predictor.predict(np.asarray(image))[0], probabilities, predictor.classes)


def test_topk_is_capped_and_sorted(predictor: Predictor, tiny_run: Path) -> None:
    result = predictor.predict(tiny_test_images(tiny_run)[0], topk=50)[0]
    assert len(result.topk) == len(predictor.classes)
    probs = [p for _, p in result.topk]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert result.topk[0] == (result.label, pytest.approx(result.probability))


def test_unusable_inputs_raise_clear_errors(predictor: Predictor) -> None:
    for bad in (object(), np.zeros((2, 3, 4, 5, 6)), np.zeros((7, 7, 7)), np.full((5, 5), np.nan), np.zeros((5, 5), dtype=bool)):
        with pytest.raises(PredictError):
            predictor.predict(bad)


def test_many_image_paths_given_to_predict_name_predict_paths(predictor: Predictor, tiny_run: Path, tmp_path: Path) -> None:
    """predict() takes one image per item: a folder, .zip, CSV or glob used to fail as 'not an
    image' or 'cannot read', with no word of the call that reads it."""
    write_folder(tiny_run, tmp_path / "images")
    (tmp_path / "rows.csv").write_text("0\n")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.write(next((tmp_path / "images").rglob("*.png")), "a.png")
    for many in (tmp_path / "images", tmp_path / "images.zip", str(tmp_path / "rows.csv"), str(tmp_path / "images" / "*" / "*.png")):
        with pytest.raises(PredictError, match=r"predict\(\) reads one image per item; use predict_paths"):
            predictor.predict(many)
    assert len(predictor.predict_paths([str(tmp_path / "images.zip")]).predictions) == 1


@pytest.mark.parametrize("scale", [255.0, -1.0])
def test_float_pixels_outside_0_to_1_are_refused_not_clipped(predictor: Predictor, scale: float) -> None:
    """A 0..255 float image, or one already normalised (negative values), used to be clipped to
    white or black and classified without a word."""
    image = torch.rand(1, 12, 12, generator=torch.Generator().manual_seed(0)) * scale
    with pytest.raises(PredictError, match=r"float image pixels must be in 0\.\.1 \(as ToTensor gives\); these run .*Normalize"):
        predictor.predict(image)
    assert len(predictor.predict(image.abs() / abs(scale))) == 1  # the same image in 0..1


def write_folder(tiny_run: Path, root: Path) -> dict[str, int]:
    """Test images as PNGs in nested class folders; returns file -> index in the IDX test set."""
    index = {}
    for i, image in enumerate(tiny_test_images(tiny_run)):
        folder = root / "deep" / f"class-{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:03d}.png")
        index[str(folder / f"{i:03d}.png")] = i
    return index


def test_cli_folder_predictions_equal_evaluate_image_by_image(tiny_run: Path, cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    index = write_folder(tiny_run, tmp_path / "pngs")
    result = cli("predict", str(tiny_run), str(tmp_path / "pngs"), "--format", "json", "--no-progress")
    assert result.code == 0, result.err
    rows = json.loads(result.out)
    assert len(rows) == len(index) and set(rows[0]) == {"path", "label", "index", "probability", "topk"}
    evaluation = evaluate_checkpoint(tiny_run, write=False)
    for row in rows:
        assert row["index"] == evaluation.predictions[index[row["path"]]]
        assert row["topk"][0]["label"] == row["label"]


def test_predict_uses_the_runs_own_tta_as_evaluate_does(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """A run trained with train.tta shift reports its test score with shifts, and evaluate repeats
    them; predict classified each image once, so its labels disagreed with that score."""
    data = write_tiny_idx(tmp_path / "idx", train=200, test=60, side=SIDE, seed=5)
    args = ["--data", "mnist", "--data-dir", str(data), "--epochs", "1", "--no-progress", "--model", "lenet", "--data.batch-size", "16"]
    assert cli("train", *args, "--train.tta", "shift", "--out", str(tmp_path / "run")).code == 0
    index = write_folder(tmp_path / "run", tmp_path / "pngs")
    answers = {}
    for mode in ("shift", "none"):
        flags = ["--tta", mode] if mode == "none" else []  # the run's own mode by default
        result = cli("predict", str(tmp_path / "run"), str(tmp_path / "pngs"), "--format", "json", "--no-progress", *flags)
        assert result.code == 0, result.err
        answers[mode] = {row["path"]: row["index"] for row in json.loads(result.out)}
        evaluation = evaluate_checkpoint(tmp_path / "run", tta=mode, write=False)
        assert all(answers[mode][path] == evaluation.predictions[i] for path, i in index.items()), mode
    assert answers["shift"] != answers["none"]  # shifts change some answers here, so the test can tell them apart
    assert Predictor.from_checkpoint(tmp_path / "run").tta == "shift"
    refused = cli("predict", str(tmp_path / "run"), str(tmp_path / "pngs"), "--tta", "flip")
    assert refused.code == 2 and "--tta flip is not allowed for mnist" in refused.err and refused.out == ""


def test_cli_globs_csv_and_formats(tiny_run: Path, cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_folder(tiny_run, tmp_path / "pngs")
    images = tiny_test_images(tiny_run)[:4]
    with (tmp_path / "rows.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["label", *[f"p{i}" for i in range(SIDE * SIDE)]], *[[0, *img.flatten().tolist()] for img in images]])
    result = cli("predict", str(tiny_run), "pngs/**/00*.png", "rows.csv", "--format", "csv", "--topk", "2")
    assert result.code == 0, result.err
    table = list(csv.reader(io.StringIO(result.out)))
    assert table[0] == ["path", "label", "index", "probability", "top1_label", "top1_probability", "top2_label", "top2_probability"]
    paths = [row[0] for row in table[1:]]
    assert paths[:10] == sorted(str(p) for p in Path("pngs").glob("**/00*.png"))
    assert paths[10:] == [f"rows.csv:{n}" for n in range(1, 5)]
    pngs = {Path(row[0]).name: row[1:4] for row in table[1:11]}
    for n in range(4):  # a CSV row and the PNG of the same image agree
        assert table[11 + n][1:4] == pngs[f"{n:03d}.png"]
    table_out = cli("predict", str(tiny_run), "pngs/deep/class-3/003.png")
    assert table_out.code == 0 and "003.png" in table_out.out and "path" in table_out.out.splitlines()[0]


def test_unreadable_files_fail_alone_with_exit_1(tiny_run: Path, cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_folder(tiny_run, tmp_path / "pngs")
    (tmp_path / "pngs" / "deep" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = cli("predict", str(tiny_run), "pngs", "missing.png", "--format", "json", "--no-progress")
    assert result.code == 1
    assert len(json.loads(result.out)) == 60
    lines = result.err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in result.err
    assert any("broken.png" in line and "cannot" in line for line in lines)
    assert any("missing.png" in line and "no such file" in line for line in lines)


def test_a_zip_of_images_is_predicted_member_by_member_as_its_folder_is(tiny_run: Path, cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import zipfile

    write_folder(tiny_run, tmp_path / "pngs")
    (tmp_path / "pngs" / "deep" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with zipfile.ZipFile(tmp_path / "pngs.zip", "w") as archive:
        for file in sorted((tmp_path / "pngs").rglob("*.png")):
            archive.write(file, file.relative_to(tmp_path / "pngs").as_posix())
        archive.writestr("__MACOSX/deep/._000.png", b"resource fork")  # left out, as training's reader does
        archive.writestr("notes.txt", b"not an image")
    Path(tmp_path / "notazip.zip").write_bytes(b"hello")
    zipped = cli("predict", str(tiny_run), "pngs.zip", "notazip.zip", "--format", "json", "--no-progress")
    assert zipped.code == 1
    (tmp_path / "pngs" / "deep" / "broken.png").unlink()
    folder = cli("predict", str(tiny_run), "pngs", "--format", "json", "--no-progress")
    by_path = {row["path"]: row for row in json.loads(folder.out)}
    rows = json.loads(zipped.out)
    assert len(rows) == len(by_path) == 60
    for row in rows:
        assert row["path"].startswith("pngs.zip/deep/class-")
        same = by_path[row["path"].replace("pngs.zip/", "pngs/", 1)]
        assert (row["label"], row["topk"]) == (same["label"], same["topk"])
    assert zipped.err.strip().splitlines() == [
        "deepfit: cannot predict pngs.zip/deep/broken.png: not an image (format not recognised)",
        "deepfit: cannot predict notazip.zip: not a readable zip file (File is not a zip file)",
    ]
    with zipfile.ZipFile(tmp_path / "text.zip", "w") as archive:
        archive.writestr("notes.txt", b"not an image")
    empty = cli("predict", str(tiny_run), "text.zip")
    assert empty.code == 1 and "cannot predict text.zip: no images found in this .zip" in empty.err


def test_progress_bar_for_many_files(tiny_run: Path, cli, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars are drawn on a terminal only
    image = tiny_test_images(tiny_run)[0]
    for i in range(120):
        Image.fromarray(image, mode="L").save(tmp_path / f"{i}.png")
    result = cli("predict", str(tiny_run), str(tmp_path), "--format", "json")
    assert result.code == 0 and len(json.loads(result.out)) == 120
    assert "predicting" in result.err and "120" in result.err


def test_gray_files_feed_a_colour_model_and_colour_files_a_gray_one(tmp_path: Path) -> None:
    """A 3-channel model gets a grayscale file with the gray copied into R, G and B."""
    from tests.test_export import write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "rgb.pt", "lenet", input_shape=(3, 16, 16))
    predictor = Predictor.from_checkpoint(checkpoint)
    gray = np.random.default_rng(1).integers(0, 256, size=(16, 16), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    rgb = torch.from_numpy(np.repeat(gray[None], 3, axis=0)).unsqueeze(0)  # (1, 3, H, W)
    probabilities = torch.softmax(reference_logits(checkpoint, rgb), dim=1)[0]
    check(predictor.predict(tmp_path / "gray.png")[0], probabilities, predictor.classes)
    check(predictor.predict(Image.fromarray(gray, mode="L"))[0], probabilities, predictor.classes)


def test_batch_size_does_not_change_the_answer(tiny_run: Path) -> None:
    images = tiny_test_images(tiny_run)[:, None]  # (N, 1, H, W)
    together = Predictor.from_checkpoint(tiny_run, batch_size=64).predict(images)
    one_by_one = Predictor.from_checkpoint(tiny_run, batch_size=1).predict(images)
    with pytest.raises(PredictError, match="batch of gray images"):
        Predictor.from_checkpoint(tiny_run).predict(images[:, 0])  # (N, H, W): one image or N? refused
    assert [p.index for p in together] == [p.index for p in one_by_one]
    assert [p.probability for p in together] == pytest.approx([p.probability for p in one_by_one], abs=1e-5)


def test_csv_rows_of_another_width_name_the_models_pixels(predictor: Predictor, tmp_path: Path) -> None:
    """Rows of 28x28 pixels for a 12x12 model said 'expected 145 (label + pixels)', though rows
    without a label are read too."""
    (tmp_path / "rows.csv").write_text("\n".join(",".join(["7"] * 784) for _ in range(3)) + "\n")
    failures = predictor.predict_paths([str(tmp_path / "rows.csv")]).failures
    assert [f.reason for f in failures] == [
        f"{tmp_path / 'rows.csv'} line 1: 784 values, expected 144 pixels (1x12x12), or 145 with a label first; 3 row(s) like this"
    ]
