"""`deepfit evaluate`: the report agrees exactly with scikit-learn's confusion_matrix and
classification_report on the same predictions, the predictions agree with a model rebuilt by hand
from the checkpoint, and the files land in the run folder (or beside a bare checkpoint)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import classification_report, confusion_matrix

from deepfit.cli import main
from deepfit.config import config_from_dict
from deepfit.evaluation import Evaluation, evaluate_checkpoint
from deepfit.models import build_model
from tests.conftest import write_tiny_idx

TINY = ("--epochs", "1", "--no-progress", "--data.batch-size", "16", "--model", "lenet", "--data.val-fraction", "0.2")


def train(out: Path, data_dir: Path, *extra: str, data: str = "mnist") -> Path:
    assert main(["train", "--data", data, "--data-dir", str(data_dir), *TINY, "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One lenet epoch on a tiny noisy dataset: good enough to learn, bad enough to confuse classes."""
    root = tmp_path_factory.mktemp("eval")
    data = write_tiny_idx(root / "idx", train=200, test=120, side=12, seed=3)
    return train(root / "run", data)


def check_against_sklearn(result: Evaluation) -> None:
    """Every number of the report equals scikit-learn's on the same labels and predictions."""
    report, y, p = result.report, result.labels, result.predictions
    k = len(report.classes)
    assert np.array_equal(np.array(report.confusion), confusion_matrix(y, p, labels=list(range(k))))
    oracle: dict[str, Any] = classification_report(
        y, p, labels=list(range(k)), target_names=report.classes, output_dict=True, zero_division=0
    )
    assert report.accuracy == pytest.approx(float(np.mean(y == p)), abs=1e-12)
    for scores in report.per_class:
        expected = oracle[scores.name]
        assert (scores.precision, scores.recall, scores.f1) == pytest.approx(
            (expected["precision"], expected["recall"], expected["f1-score"]), abs=1e-12
        )
        assert scores.support == expected["support"]
    for mine, theirs in ((report.macro, "macro avg"), (report.weighted, "weighted avg")):
        expected = oracle[theirs]
        assert (mine.precision, mine.recall, mine.f1) == pytest.approx(
            (expected["precision"], expected["recall"], expected["f1-score"]), abs=1e-12
        )
        assert mine.support == expected["support"] == len(y)


def reference_logits(checkpoint: Path, images: torch.Tensor) -> torch.Tensor:
    """The model rebuilt by hand from the checkpoint, images normalised the textbook way."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = config_from_dict(state["config"])
    model = build_model(config.model, input_shape=tuple(state["input_shape"]), num_classes=len(state["classes"]))
    model.load_state_dict(state["model"])
    model.eval()
    mean = torch.tensor(state["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(state["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        return model((images.float() / 255 - mean) / std)


def read_idx(path: Path) -> np.ndarray:
    """A minimal IDX reader (uint8 data), independent of deepfit's."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw[4 + 4 * dims :], dtype=np.uint8).reshape(shape)


def test_report_equals_sklearn_and_a_hand_rebuilt_model(tiny_run: Path) -> None:
    result = evaluate_checkpoint(tiny_run)
    check_against_sklearn(result)
    assert 0 < result.report.accuracy < 1, "the tiny run should make some mistakes, else the check is weak"
    assert len(np.unique(result.predictions)) > 3
    data = tiny_run.parent / "idx"
    images = torch.from_numpy(read_idx(data / "t10k-images-idx3-ubyte.gz").copy()).unsqueeze(1)
    labels = read_idx(data / "t10k-labels-idx1-ubyte.gz")
    assert np.array_equal(result.labels, labels)
    logits = reference_logits(tiny_run / "checkpoints" / "best.pt", images)
    assert np.array_equal(result.predictions, logits.argmax(1).numpy())
    expected_loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels.astype(np.int64))))
    assert result.report.loss == pytest.approx(expected_loss, rel=1e-4)
    topk = logits.topk(result.report.topk, dim=1).indices.numpy()
    assert result.report.topk_accuracy == pytest.approx(float(np.mean((topk == labels[:, None]).any(1))))


def test_most_confused_pairs_are_the_largest_off_diagonal_cells(tiny_run: Path) -> None:
    report = evaluate_checkpoint(tiny_run, write=False).report
    matrix = np.array(report.confusion)
    off = matrix - np.diag(np.diag(matrix))
    counts = [pair.count for pair in report.most_confused]
    assert counts == sorted(off.flatten().tolist(), reverse=True)[: len(counts)]
    assert counts and all(c > 0 for c in counts)
    for pair in report.most_confused:
        t, p = report.classes.index(pair.true), report.classes.index(pair.predicted)
        assert matrix[t, p] == pair.count and pair.share == pytest.approx(pair.count / matrix[t].sum())


def test_cli_prints_a_table_and_writes_report_and_figure(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tiny_run / "report.json").read_text())
    for name in saved["classes"]:
        assert f"\n{name} " in out
    assert "macro avg" in out and "weighted avg" in out and f"{saved['accuracy']:.2%}" in out
    assert saved["split"] == "test" and saved["images"] == 120 and saved["tta"] == "none"
    assert set(saved["averages"]) == {"macro", "weighted"}
    with Image.open(tiny_run / "plots" / "confusion.png") as figure:
        assert figure.size[0] > 200


def test_val_split_matches_the_training_validation_score(tiny_run: Path) -> None:
    """The seeded validation split rebuilds exactly: its accuracy is the val_acc of best.pt's epoch."""
    report = evaluate_checkpoint(tiny_run, split="val", write=False).report
    state = torch.load(tiny_run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    best = next(row for row in state["history"] if int(row["epoch"]) == int(state["best_epoch"]))
    assert report.images == 40
    assert report.accuracy == pytest.approx(best["val_acc"], abs=1e-6)


def test_bare_checkpoint_writes_beside_itself(tiny_run: Path, tmp_path: Path) -> None:
    bare = tmp_path / "model.pt"
    shutil.copy(tiny_run / "checkpoints" / "best.pt", bare)
    result = evaluate_checkpoint(bare)
    assert result.report_path == tmp_path / "model.report.json" and result.report_path.is_file()
    assert result.figure_path == tmp_path / "model.confusion.png" and result.figure_path.is_file()


@pytest.mark.parametrize("mode", ["flip", "flip-shift"])
def test_tta_flip_refused_where_mirrors_change_the_class(tiny_run: Path, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(tiny_run), "--tta", mode]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--tta {mode} is not allowed for mnist" in err and "Traceback" not in err
    assert not (tiny_run / f"report-tta-{mode}.json").exists()


def shifted_by_hand(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """images (N, C, H, W) moved dx pixels right and dy down, the uncovered edge row or column
    repeating its neighbour; built with index arithmetic, independently of deepfit's padding."""
    h, w = images.shape[-2:]
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    return images[:, :, rows][:, :, :, cols]


def test_tta_shift_averages_the_image_and_its_one_pixel_shifts(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Shifts keep every class, so they are allowed on MNIST-like data where flips are not."""
    assert main(["evaluate", str(tiny_run), "--tta", "shift"]) == 0
    assert "(test-time shift)" in capsys.readouterr().out
    saved = json.loads((tiny_run / "report-tta-shift.json").read_text())
    data = tiny_run.parent / "idx"
    images = torch.from_numpy(read_idx(data / "t10k-images-idx3-ubyte.gz").copy()).unsqueeze(1)
    checkpoint = tiny_run / "checkpoints" / "best.pt"
    views = [images] + [shifted_by_hand(images, dx, dy) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    averaged = torch.stack([reference_logits(checkpoint, view) for view in views]).mean(0)
    plain = reference_logits(checkpoint, images)
    assert saved["tta"] == "shift" and not torch.equal(averaged.argmax(1), plain.argmax(1)), "shifts should change some predictions"
    result = evaluate_checkpoint(tiny_run, tta="shift", write=False)
    assert np.array_equal(result.predictions, averaged.argmax(1).numpy())
    labels = torch.from_numpy(read_idx(data / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    assert saved["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(averaged, labels)), rel=1e-4)
    check_against_sklearn(result)


def write_image_folder(idx: Path, folder: Path) -> torch.Tensor:
    """The tiny IDX data as a folder of PNGs (train/ and test/ sub-trees, one sub-folder per
    class): a source whose flips are allowed. Returns the test images in class, then file order."""
    test = []
    for prefix, split in (("train", "train"), ("t10k", "test")):
        images = read_idx(idx / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(idx / f"{prefix}-labels-idx1-ubyte.gz")
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            (folder / split / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / split / str(label) / f"{i:04d}.png")
            if split == "test":
                test.append((int(label), i, image))
    return torch.from_numpy(np.stack([image for _, _, image in sorted(test, key=lambda t: t[:2])])).unsqueeze(1)


def test_tta_flip_averages_each_image_with_its_mirror(tmp_path: Path) -> None:
    data = write_tiny_idx(tmp_path / "idx", train=100, test=30, side=12)
    images = write_image_folder(data, tmp_path / "photos")  # an image folder allows flips (MNIST and Fashion-MNIST do not)
    assert main(["train", "--data", str(tmp_path / "photos"), *TINY, "--out", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    result = evaluate_checkpoint(run, tta="flip", write=False)
    checkpoint = run / "checkpoints" / "best.pt"
    averaged = reference_logits(checkpoint, images) + reference_logits(checkpoint, images.flip(3))
    assert result.report.tta == "flip"
    assert np.array_equal(result.predictions, averaged.argmax(1).numpy())
    check_against_sklearn(result)


def test_unknown_split_and_missing_split_are_one_line_errors(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(tiny_run), "--split", "nope"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    no_val = train(tiny_run.parent / "noval", tiny_run.parent / "idx", "--data.val-fraction", "0", "--train.monitor", "train_acc")
    assert main(["evaluate", str(no_val), "--split", "val"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no val split" in err


@pytest.mark.slow  # trains on real Fashion-MNIST: ~26 s; make test-slow runs it
@pytest.mark.data
def test_fashion_mnist_report_equals_sklearn(fashion_dir: Path, tmp_path: Path) -> None:
    """The real-data check: one lenet epoch on Fashion-MNIST, evaluated on the 10,000 test images."""
    run = train(tmp_path / "fm", fashion_dir, "--data.batch-size", "256", data="fashion-mnist")  # later flags win
    result = evaluate_checkpoint(run)
    check_against_sklearn(result)
    assert np.array_equal(result.labels, read_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz"))
    assert result.report.images == 10_000 and result.report.accuracy > 0.7
    state = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert result.report.accuracy == pytest.approx(json.loads((run / "report.json").read_text())["accuracy"])
    assert state["classes"] == result.report.classes


def test_data_option_scores_another_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """--data NAME rebuilds that source instead of the run's (same class names: scikit-learn's 8x8
    digits for a model trained on 8x8 MNIST-format data), keeping the checkpoint's normalisation;
    a source whose classes the model does not know is refused."""
    from sklearn.datasets import load_digits

    from deepfit.data.sources import load_digits_source

    run = train(tmp_path / "run", write_tiny_idx(tmp_path / "mnist", side=8), "--model", "mlp")
    result = evaluate_checkpoint(run, data="digits", write=False)
    check_against_sklearn(result)
    expected_counts = [round(n * 0.2) for n in np.bincount(load_digits().target)]  # its fixed stratified 20% test split
    assert result.report.data == "digits" and np.bincount(result.labels, minlength=10).tolist() == expected_counts
    test_split = load_digits_source().test  # the images, to check the checkpoint's own normalisation was used
    assert test_split is not None and np.array_equal(test_split.labels.numpy(), result.labels)
    logits = reference_logits(run / "checkpoints" / "best.pt", test_split.images)
    assert np.array_equal(result.predictions, logits.argmax(1).numpy())
    monkeypatch.setenv("DEEPFIT_DATASETS", str(tmp_path / "sets"))
    write_tiny_idx(tmp_path / "sets" / "fashion-mnist", side=8)
    assert main(["evaluate", str(run), "--data", "fashion-mnist"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "classes the model does not know" in err


def test_a_run_whose_own_data_has_no_test_split_is_evaluated_on_its_validation_split(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """As its training scored it; `evaluate RUN` said 'has no test split; ... choose --split val|all'."""
    rng = np.random.default_rng(0)
    for i in range(40):
        (tmp_path / "photos" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(tmp_path / "photos" / "ab"[i % 2] / f"{i}.png")
    assert cli("train", "--data", "photos", "--model", "mlp", "--epochs", "1", "--no-progress", "--out", "run").code == 0
    own = cli("evaluate", "run")
    assert own.code == 0, own.err
    assert "report: run/report.json" in own.out  # the run's own evaluation, not report-val.json
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["split"] == "val" and report["images"] == 4  # the seeded tenth held out in training
    asked = cli("evaluate", "run", "--split", "test")
    assert asked.code == 2 and "has no test split; it has val" in asked.err
    every = cli("evaluate", "run", "--split", "all")
    assert every.code == 0 and "report-all.json" in every.out
    assert cli("report", "run").code == 0  # the page names the split the run's own evaluation scored
    assert "own evaluation: its val split" in (tmp_path / "run" / "report.html").read_text(encoding="utf-8").replace("&#x27;", "'")


def test_a_folder_without_split_folders_is_scored_whole_by_default(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`evaluate RUN --data photos/` on class folders alone scores all of them (a test split would
    be a missing split, and its 'val' a random tenth); an asked-for --split test still says there is none."""
    rng = np.random.default_rng(0)
    for i in range(30):
        (tmp_path / "photos" / str(i % 10)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), mode="L").save(tmp_path / "photos" / str(i % 10) / f"{i}.png")
    whole = evaluate_checkpoint(tiny_run, data=str(tmp_path / "photos"), write=False)
    assert whole.report.split == "all" and whole.report.images == 30
    check_against_sklearn(whole)
    asked = evaluate_checkpoint(tiny_run, data=str(tmp_path / "photos"), split="all", write=False)
    assert np.array_equal(asked.predictions, whole.predictions) and np.array_equal(asked.labels, whole.labels)
    assert main(["evaluate", str(tiny_run), "--data", str(tmp_path / "photos"), "--split", "test"]) == 2
    assert "has no test split" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_run), "--data", str(tmp_path / "photos")]) == 0
    printed = capsys.readouterr().out
    assert "photos all split: 30 images" in printed and "report-data-photos-all.json" in printed
    assert evaluate_checkpoint(tiny_run, write=False).report.split == "test"  # the run's own data: its test split


def test_split_all_scores_every_image_of_the_source(tiny_run: Path) -> None:
    result = evaluate_checkpoint(tiny_run, split="all", write=False)
    assert result.report.split == "all" and result.report.images == 200 + 120
    check_against_sklearn(result)


def test_html_report_shows_the_evaluation(tiny_run: Path) -> None:
    from deepfit.report import write_report

    evaluate_checkpoint(tiny_run)
    section = write_report(tiny_run).read_text().split("<h2>Evaluation</h2>", 1)[1].split("<h2>", 1)[0]
    report = json.loads((tiny_run / "report.json").read_text())
    assert "per class" in section and "most confused" in section and "averages" in section
    assert all(f"<td>{name}</td>" in section for name in report["classes"])


def test_relabel_maps_source_classes_onto_the_model_by_name() -> None:
    from deepfit.data import ImageSet
    from deepfit.evaluation import relabel

    images = ImageSet(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 1]))
    mapped = relabel(images, ["cat", "dog", "owl"], ["owl", "cat", "dog", "eel"], "folder")
    assert mapped.labels.tolist() == [1, 2, 0, 2]
    assert relabel(images, ["a", "b", "c"], ["a", "b", "c"], "same") is images
    with pytest.raises(Exception, match="classes the model does not know: yak"):
        relabel(images, ["cat", "yak", "owl"], ["owl", "cat", "dog"], "folder")


def test_train_tta_shift_scores_the_test_split_as_evaluate_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_tiny_idx(tmp_path / "idx", train=200, test=120, side=12, seed=3)
    run = train(tmp_path / "run", data, "--train.tta", "shift")
    out = capsys.readouterr().out
    report = evaluate_checkpoint(run, tta="shift", write=False).report
    assert f"test_acc {report.accuracy:.2%}" in out
    plain = evaluate_checkpoint(run, tta="none", write=False).report
    assert report.loss != plain.loss  # the run's test line is the shifted score, not the plain one


def test_evaluate_repeats_the_runs_own_tta_unless_told_otherwise(tmp_path: Path) -> None:
    data = write_tiny_idx(tmp_path / "idx", train=200, test=120, side=12, seed=3)
    run = train(tmp_path / "run", data, "--train.tta", "shift")
    assert main(["evaluate", str(run)]) == 0
    own = json.loads((run / "report.json").read_text())
    shifted = evaluate_checkpoint(run, tta="shift", write=False).report
    assert own["tta"] == "shift" and own["loss"] == pytest.approx(shifted.loss)
    assert main(["evaluate", str(run), "--tta", "none"]) == 0
    plain = json.loads((run / "report-tta-none.json").read_text())
    assert plain["tta"] == "none" and plain["loss"] != own["loss"]
    assert json.loads((run / "report.json").read_text()) == own  # the plain score went beside it, not over it


def test_train_tta_flip_on_data_mirrors_may_change_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_tiny_idx(tmp_path / "idx", train=100, test=30, side=12)
    train(tmp_path / "run", data, "--train.tta", "flip")
    assert "train.tta flip flips test images, but a mirrored mnist image may change class" in capsys.readouterr().err


def test_another_sources_images_resized_to_the_model_say_from_what(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 12x12 model scored on 8x8 digits, or on 20x20 photos, said nothing of the resize (a digits
    model on MNIST scored 16% without a word of 28x28 becoming 8x8)."""
    assert evaluate_checkpoint(tiny_run, write=False).report.resized == ""  # its own data: as trained
    by_path = evaluate_checkpoint(tiny_run, data=Path("digits"), write=False)  # a Path as its text (it failed: not iterable)
    assert by_path.report.resized == "8x8 to 12x12" and by_path.report.data == "digits"
    for i in range(30):
        (tmp_path / "photos" / str(i % 10)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 20), 8 * i, dtype=np.uint8), mode="L").save(tmp_path / "photos" / str(i % 10) / f"{i}.png")
    assert main(["evaluate", str(tiny_run), "--data", str(tmp_path / "photos")]) == 0
    assert (
        capsys.readouterr().out.splitlines()[0]
        == f"{tmp_path / 'photos'} all split: 30 images, resized from 20x20 to 12x12 (the model's input size)"
    )
