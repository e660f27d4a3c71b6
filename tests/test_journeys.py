"""Issue 12: the journeys a new user took that broke or misled, each replayed on a finished run
(export without onnx, one test accuracy per run, evaluations beside the run's own, images for
`show`, predict's edge cases)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from deepfit.checkpoint import load_checkpoint
from tests.conftest import write_tiny_idx

TRAIN = ("--model", "lenet", "--epochs", "3", "--no-progress", "--data.batch-size", "16", "--sched.name", "none", "--optim.lr", "0.02")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 3-epoch lenet run on tiny MNIST-format data, and what `train` printed."""
    from deepfit.cli import main

    root = tmp_path_factory.mktemp("journeys")
    data = write_tiny_idx(root / "idx", train=200, test=60, side=12, seed=5)
    out = root / "run"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "--data", "mnist", "--data-dir", str(data), "--out", str(out), *TRAIN]) == 0
    return out, printed.getvalue()


@pytest.fixture
def run(finished: tuple[Path, str], tmp_path: Path) -> Path:
    """A private copy of the finished run (commands write into it)."""
    return Path(shutil.copytree(finished[0], tmp_path / "run"))


# -- item 1: export needs onnx; a missing package is one line, exit 2, nothing left behind --


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_export_without_an_onnx_package_is_one_line_and_leaves_nothing(
    cli, run: Path, monkeypatch: pytest.MonkeyPatch, package: str
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, package, None)  # what `import onnx` sees when it is not installed
    result = cli("export", str(run), "--format", "onnx")
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err.strip() == (
        f"deepfit: error: deepfit export --format onnx needs the package {package!r}, which is not installed: pip install {package}"
    )
    assert not (run / "export").exists()


def test_a_failed_export_removes_the_folder_it_created(cli, run: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import importlib

    from deepfit.export import ExportError

    def broken(*args: object) -> None:
        raise ExportError("cannot export this model")

    monkeypatch.setattr(importlib.import_module("deepfit.export"), "write_onnx", broken)
    result = cli("export", str(run), "--format", "onnx")
    assert result.code == 2 and not (run / "export").exists()


# -- item 4: one run, one test accuracy: the final line, evaluate and predict all use best.pt --


def test_the_final_test_line_names_best_pt_and_evaluate_agrees(cli, finished: tuple[Path, str], run: Path) -> None:  # type: ignore[no-untyped-def]
    from deepfit.predict import Predictor

    line = re.search(r"test_acc (\d+\.\d\d)% \(best\.pt, epoch (\d)\)", finished[1])
    assert line is not None, finished[1]
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert int(line.group(2)) == best["epoch"] == best["best_epoch"]
    evaluated = cli("evaluate", str(run))
    assert evaluated.code == 0, evaluated.err
    assert f"accuracy {line.group(1)}%" in evaluated.out  # the same number, to the printed digit
    assert Predictor.from_checkpoint(run).trained.path.name == "best.pt"


# -- item 5: evaluate keeps the run's own evaluation; the others go beside it, named --


def test_other_evaluations_go_beside_the_runs_own_and_the_report_tells_them_apart(cli, run: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("evaluate", str(run)).code == 0
    own = (run / "report.json").read_bytes()
    assert json.loads(own)["split"] == "test" and json.loads(own)["tta"] == "none"
    val = cli("evaluate", str(run), "--split", "val")
    assert val.code == 0 and "report-val.json" in val.out
    last = cli("evaluate", str(run / "checkpoints" / "last.pt"), "--split", "all")
    assert last.code == 0, last.err
    assert (run / "report.json").read_bytes() == own  # the run's record is untouched
    assert json.loads((run / "report-val.json").read_text())["split"] == "val"
    assert json.loads((run / "report-last-all.json").read_text())["checkpoint"].endswith("last.pt")
    assert (run / "plots" / "confusion-val.png").is_file() and (run / "plots" / "confusion-last-all.png").is_file()
    page = (run / "report.html").read_text() if cli("report", str(run)).code == 0 else ""
    assert "the run&#x27;s own evaluation" in page
    assert "<h2>Evaluation: val</h2>" in page and "<h2>Evaluation: last-all</h2>" in page


def test_tta_flip_is_refused_on_fashion_mnist(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = write_tiny_idx(tmp_path / "idx", train=60, test=20, side=12)
    trained = cli(
        "train", "--data", "fashion-mnist", "--data-dir", str(data), "--out", "fm", "--model", "mlp", "--epochs", "1", "--no-progress"
    )
    assert trained.code == 0, trained.err
    result = cli("evaluate", "fm", "--tta", "flip")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "--tta flip is not allowed for fashion-mnist" in result.err and not (tmp_path / "fm" / "report-tta-flip.json").exists()


# -- item 8: predict's edge cases --


def pixel_rows(count: int, *, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 12 * 12))


def test_predict_reads_csv_rows_without_a_label_column(cli, run: Path) -> None:  # type: ignore[no-untyped-def]
    from deepfit.predict import Predictor

    rows = pixel_rows(3)
    np.savetxt(run / "rows.csv", rows, fmt="%d", delimiter=",")
    result = cli("predict", str(run), str(run / "rows.csv"), "--format", "json")
    assert result.code == 0, result.err
    got = json.loads(result.out)
    expected = Predictor.from_checkpoint(run).predict([row.reshape(12, 12).astype(np.uint8) for row in rows])
    assert [p["path"].rsplit(":", 1)[1] for p in got] == ["1", "2", "3"]
    assert [p["index"] for p in got] == [p.index for p in expected]
    assert [p["probability"] for p in got] == pytest.approx([p.probability for p in expected], abs=1e-6)


def test_predict_on_an_empty_folder_says_so_and_exits_1(cli, run: Path) -> None:  # type: ignore[no-untyped-def]
    (run / "empty").mkdir()
    result = cli("predict", str(run), str(run / "empty"))
    assert result.code == 1 and result.out == ""
    assert (
        result.err.strip()
        == f"deepfit: cannot predict {run / 'empty'}: no images found in this folder (" + result.err.split("(", 1)[1].strip()
    )


def test_predict_names_a_corrupt_file_once_and_predicts_the_rest(cli, run: Path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    shots = run / "shots"
    shots.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, size=(12, 12), dtype=np.uint8)).save(shots / "good.png")
    (shots / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    result = cli("predict", str(run), str(shots), "--format", "csv")
    assert result.code == 1 and str(shots / "good.png") in result.out and "broken.png" not in result.out
    assert result.err.strip().startswith(f"deepfit: cannot predict {shots / 'broken.png'}: ")
    assert result.err.count("broken.png") == 1 and len(result.err.strip().splitlines()) == 1


def test_predict_into_a_pipe_that_closes_early_exits_quietly(run: Path) -> None:
    import subprocess

    np.savetxt(run / "many.csv", pixel_rows(2000), fmt="%d", delimiter=",")  # far more JSON than a pipe buffer holds
    child = subprocess.Popen(
        [sys.executable, "-m", "deepfit.cli", "predict", str(run), str(run / "many.csv"), "--format", "json", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None and child.stdout.readline().strip() == b"["  # what `| head -1` reads
    child.stdout.close()  # ... and then head exits
    _, err = child.communicate(timeout=300)
    assert child.returncode == 141 and err == b""


# -- item 6: show features|gradcam --image decodes like predict --


@pytest.mark.parametrize(("kind", "suffix"), [("features", ".bmp"), ("gradcam", ".webp"), ("gradcam", ".tiff")])
def test_show_takes_any_image_predict_takes(cli, run: Path, kind: str, suffix: str) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    from deepfit.inspect import load_image_file
    from deepfit.predict import Predictor

    image = run / f"colour{suffix}"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(20, 16, 3), dtype=np.uint8)).save(image)  # colour, other size
    result = cli("show", kind, str(run), "--image", str(image))
    assert result.code == 0, result.err
    assert (run / "plots" / f"{kind}-colour.png").is_file()
    predictor = Predictor.from_checkpoint(run)
    assert np.array_equal(load_image_file(image, predictor.input_shape).numpy(), predictor.to_pixels(image).numpy())


def test_show_with_an_unreadable_image_is_one_line(cli, run: Path) -> None:  # type: ignore[no-untyped-def]
    (run / "broken.png").write_bytes(b"not an image")
    result = cli("show", "gradcam", str(run), "--image", str(run / "broken.png"))
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1 and "broken.png" in result.err
