"""The regression task through the command line: train on a CSV, evaluate, predict, export,
show, report, --resume, and bad inputs (exit 2, one line, no run folder)."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfit.checkpoint import load_checkpoint
from deepfit.cli import build_parser, main, resolve_train_config
from deepfit.regression.split import split_rows

ROWS = 120


def write_table(path: Path, *, rows: int = ROWS, seed: int = 0, gaps: bool = False) -> Path:
    """y = 2a - 3b + 5 + noise(0.1), an id column and a text column; gaps: two rows lack a value."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(10, 3, rows), rng.normal(-2, 1, rows)
    y = 2 * a - 3 * b + 5 + rng.normal(0, 0.1, rows)
    lines = ["id,a,b,city,y"] + [f"r{i},{a[i]:.6f},{b[i]:.6f},{'paris' if i % 2 else 'rome'},{y[i]:.6f}" for i in range(rows)]
    if gaps:
        lines[3] = lines[3].replace(",paris,", ",paris,").split(",", 2)[0] + ",," + lines[3].split(",", 2)[2]  # a missing
        lines[6] = lines[6].rsplit(",", 1)[0] + ","  # y missing
    path.write_text("\n".join(lines) + "\n")
    return path


def raw_linear(run: Path) -> tuple[np.ndarray, float]:
    """The best checkpoint's line in the file's units: y = x @ w + b (standardisation folded in)."""
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    w = state["model"]["weight"][0].double().numpy() * state["target_std"] / np.asarray(state["std"])
    b = float(state["model"]["bias"][0]) * state["target_std"] + state["target_mean"] - float(w @ np.asarray(state["mean"]))
    return w, b


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A linear run on a CSV with features a, b: (run folder, CSV)."""
    root = tmp_path_factory.mktemp("regression-cli")
    table = write_table(root / "table.csv")
    code = main(
        ["train", "--data", str(table), "--target", "y", "--features", "a,b", "--epochs", "60", "--no-progress", "--out", str(root / "run")]
    )
    assert code == 0
    return root / "run", table


def test_missing_values_stop_with_one_line_then_train_with_drop_missing(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    table = write_table(tmp_path / "gaps.csv", gaps=True)
    failed = cli("train", "--task", "regression", "--data", str(table), "--target", "y", "--epochs", "3", "--no-progress")
    assert failed.code == 2 and failed.err.count("\n") == 1 and "Traceback" not in failed.err
    assert "2 rows of 120 have missing values: a (1 row), y (1 row)" in failed.err and "--data.drop-missing true" in failed.err
    assert not (tmp_path / "runs").exists()
    ok = cli(
        "train",
        "--task",
        "regression",
        "--data",
        str(table),
        "--target",
        "y",
        "--epochs",
        "3",
        "--no-progress",
        "--data.drop-missing",
        "true",
    )
    assert ok.code == 0, ok.err
    assert "dropped 2 row(s) with missing values" in ok.out and "ignored text column(s): id, city" in ok.out
    assert "118 rows" in ok.out and "2 feature(s) -> y" in ok.out  # id is text (r0, r1, ...) and ignored too
    lines = ok.out.splitlines()  # what was read and left out comes before the first epoch, not after the last
    assert lines[0].startswith("data: ") and lines[1].startswith("ignored text column(s)") and lines[3].startswith("epoch 1/3")


def test_a_stray_text_cell_in_a_number_column_is_named(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A column of numbers with a typo is left out like a text column, but the line says which
    cell made it text; a real text column (city) gets no such line."""
    table = write_table(tmp_path / "typo.csv")
    lines = [line.split(",") for line in table.read_text().splitlines()]  # lines[0]: id,a,b,city,y
    lines[5][2], lines[9][2] = "1.2x", "oops"  # b of data rows 5 and 9
    table.write_text("\n".join(",".join(fields) for fields in lines) + "\n")
    ok = cli("train", "--task", "regression", "--data", str(table), "--target", "y", "--epochs", "2", "--no-progress")
    assert ok.code == 0, ok.err
    assert "ignored text column(s): id, b, city" in ok.out
    assert "column 'b' holds numbers but '1.2x' in data row 5 and 1 more cell: fix or blank such cells" in ok.out
    assert "column 'city'" not in ok.out and "column 'id'" not in ok.out


def test_data_info_describes_a_table_and_names_its_stray_cell(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    table = write_table(tmp_path / "typo.csv")
    lines = [line.split(",") for line in table.read_text().splitlines()]
    lines[3][1] = "n.a."  # a of data row 3
    table.write_text("\n".join(",".join(fields) for fields in lines) + "\n")
    info = cli("data", "info", str(table), "--data.target", "y")  # a target column: a table, as train infers it
    assert info.code == 0, info.err
    assert f"{table}: {ROWS} rows, 1 feature(s) -> y" in info.out and "features: b\n" in info.out
    assert "ignored text column(s): id, a, city" in info.out and "column 'a' holds numbers but 'n.a.' in data row 3: fix" in info.out
    for args, message in (
        (("info", str(table), "--data.task", "regression"), "name the column to predict with --target COLUMN"),
        (("info", str(table), "--data.task", "node"), "a node task's edge-list CSV needs its node table: --data.nodes"),
        (("info", str(tmp_path / "edges.csv"), "--data.task", "node"), f"graph file {tmp_path / 'edges.csv'} does not exist"),
    ):
        refused = cli("data", *args)
        assert refused.code == 2 and refused.err.count("\n") == 1 and message in refused.err, refused.err


def test_train_writes_the_run_folder(trained: tuple[Path, Path]) -> None:
    run, _ = trained
    for name in (
        "config.yaml",
        "metrics.csv",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        *(f"plots/{k}.png" for k in ("curves", "predicted", "residuals", "feature")),
    ):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 60 and {"val_r2", "val_rmse", "train_mse"} <= set(rows[0])
    w, b = raw_linear(run)
    assert np.allclose(w, [2, -3], atol=0.05) and abs(b - 5) < 0.3  # the generating line


def test_evaluate_scores_the_seeded_test_split(trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    run, table = trained
    assert main(["evaluate", str(run)]) == 0
    assert "test split: 24 rows" in capsys.readouterr().out
    report = json.loads((run / "report.json").read_text())
    data = np.genfromtxt(table, delimiter=",", names=True, dtype=None, encoding="utf-8")
    _, _, test = split_rows(ROWS, test_fraction=0.2, val_fraction=0.1, seed=0)
    w, b = raw_linear(run)
    x, y = np.c_[data["a"], data["b"]][test], data["y"][test]
    expected = x @ w + b
    assert report["rows"] == 24 and report["r2"] == pytest.approx(r2_score(y, expected), abs=1e-6)
    assert report["mse"] == pytest.approx(mean_squared_error(y, expected), rel=1e-5)
    assert report["mae"] == pytest.approx(mean_absolute_error(y, expected), rel=1e-5)
    assert (run / "plots" / "predicted.png").is_file() and (run / "plots" / "residuals.png").is_file()
    assert main(["evaluate", str(run), "--data", str(table)]) == 0  # another file: every row, the checkpoint's scaling
    everything = json.loads((run / "report.json").read_text())
    all_x, all_y = np.c_[data["a"], data["b"]], data["y"]
    assert everything["rows"] == ROWS and everything["r2"] == pytest.approx(r2_score(all_y, all_x @ w + b), abs=1e-6)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--skip-bad"]) == 2  # image files only: said, not silently ignored
    assert capsys.readouterr().err.strip() == "deepfit: error: --skip-bad leaves out bad image files; a regression table has none"


def test_predict_keeps_the_id_column_and_reports_bad_rows(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = trained
    rows = tmp_path / "new.csv"
    rows.write_text("key,b,a\nk1,-2,10\nk2,,3\nk3,0,0\n")  # any column order; no target column needed
    code = main(["predict", str(run), str(rows), "--id-column", "key", "--format", "csv"])
    out, err = capsys.readouterr()
    assert code == 1 and err.strip() == f"deepfit: cannot predict {rows} line 3: missing value in column 'b'"
    got = list(csv.reader(io.StringIO(out)))
    w, b = raw_linear(run)
    assert got[0] == ["key", "y"] and [r[0] for r in got[1:]] == ["k1", "k3"]
    assert float(got[1][1]) == pytest.approx(10 * w[0] - 2 * w[1] + b, rel=1e-5) and float(got[2][1]) == pytest.approx(b, rel=1e-5)
    assert main(["predict", str(run), str(rows), "--format", "json"]) == 1
    listed = json.loads(capsys.readouterr().out)
    assert [item["row"] for item in listed] == [f"{rows}:2", f"{rows}:4"] and listed[1]["y"] == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_runs_on_raw_rows(trained: tuple[Path, Path], tmp_path: Path, fmt: str) -> None:
    run, _ = trained
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    x = np.array([[10.0, -2.0], [0.0, 0.0], [4.0, 1.0]], dtype=np.float32)
    if fmt == "onnx":
        import onnxruntime

        from deepfit.export import read_onnx_metadata

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        meta = read_onnx_metadata(out)
        assert meta["features"] == ["a", "b"] and meta["target"] == "y"
    else:
        got = torch.jit.load(str(out))(torch.from_numpy(x)).detach().numpy()
    w, b = raw_linear(run)
    assert got.shape == (3, 1) and np.allclose(got[:, 0], x @ w + b, atol=1e-3)


def test_an_export_to_a_place_that_cannot_be_written_is_one_line(cli, trained: tuple[Path, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, _ = trained
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    out = tmp_path / "notes.txt" / "model.onnx"
    result = cli("export", str(run), "--format", "onnx", "--out", str(out))
    assert result.code == 2 and result.err.count("\n") == 1 and f"cannot write {out}" in result.err, result.err


def test_show_draws_each_figure_and_report_embeds_them(trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = trained
    for kind in ("curves", "predicted", "residuals", "feature"):
        (run / "plots" / f"{kind}.png").unlink()
        assert main(["show", kind, str(run)]) == 0
        assert (run / "plots" / f"{kind}.png").stat().st_size > 1000
    assert main(["show", "gradcam", str(run)]) == 2
    assert "valid: curves, predicted, residuals, feature" in capsys.readouterr().err
    for kind in ("curves", "predicted", "residuals", "feature"):
        (run / "plots" / f"{kind}.png").unlink()
    assert main(["show", "all", str(run)]) == 0  # every figure in one command, as for image runs
    drawn = capsys.readouterr().out.split()
    assert drawn == [str(run / "plots" / f"{kind}.png") for kind in ("curves", "predicted", "residuals", "feature")]
    assert all(Path(path).stat().st_size > 1000 for path in drawn)
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert page.count("<img ") == 4 and "(regression)" in page and "val_r2" in page


def test_resume_continues_to_the_same_weights(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    table = write_table(tmp_path / "t.csv")
    common = ["--data", str(table), "--target", "y", "--model", "mlp", "--model.hidden", "8", "--data.batch-size", "16", "--no-progress"]
    assert cli("train", *common, "--epochs", "4", "--out", "straight").code == 0
    assert cli("train", *common, "--epochs", "2", "--out", "split").code == 0
    resumed = cli("train", "--resume", "split", "--epochs", "4", "--no-progress")
    assert resumed.code == 0, resumed.err
    a, b = (load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["model"] for name in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


BAD = {
    "unknown dataset": ["--task", "regression", "--data", "nothing"],
    "no target": ["--data", "TABLE"],
    "unknown column": ["--data", "TABLE", "--target", "y", "--features", "a,zzz"],
    "absent file": ["--task", "regression", "--data", "absent.csv", "--target", "y"],
    "image model": ["--data", "line", "--model", "resnet18"],
    "class loss": ["--data", "line", "--loss.name", "cross_entropy"],
    "accuracy monitor": ["--data", "line", "--monitor", "val_acc"],
    "test fraction": ["--data", "line", "--data.test-fraction", "0.9"],
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_stop_with_one_line_and_no_run_folder(cli, tmp_path: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    table = write_table(tmp_path / "table.csv")
    args = [str(table) if a == "TABLE" else a for a in BAD[case]]
    result = cli("train", *args, "--epochs", "1", "--no-progress")
    assert result.code == 2 and result.err.startswith("deepfit: error: ") and result.err.count("\n") == 1, result.err
    assert not (tmp_path / "runs").exists()


def test_the_task_is_inferred_from_data_and_starts_from_its_defaults() -> None:
    def resolve(*argv: str):  # type: ignore[no-untyped-def]
        args, extra = build_parser().parse_known_args(["train", *argv])
        return resolve_train_config(args, extra)

    line = resolve("--data", "line")
    assert line.data.task == "regression" and (line.optim.name, line.optim.lr, line.model.name) == ("sgd", 0.2, "linear")
    assert resolve("--data", "line", "--optim.lr", "0.05").optim.lr == 0.05
    assert resolve("--task", "regression", "--data", "x.csv", "--target", "y").data.target == "y"
    digits = resolve("--data", "digits")
    assert digits.data.task == "image" and digits.optim.name == "adam"


def test_onnx_export_falls_back_to_the_torchscript_exporter(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the dynamo exporter cannot run (no onnxscript, as on the GPU machines, or a torch it
    cannot convert on), the regression export is written by the TorchScript-based one, as an
    image export is, and still takes any number of rows."""
    import onnxruntime

    from tests.test_export_fallback import failing_exporter

    calls = failing_exporter(monkeypatch, fail_dynamo=True, fail_torchscript=False)
    run, _ = trained
    out = tmp_path / "model.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    assert calls == [True, False]
    x = np.array([[10.0, -2.0], [0.0, 0.0], [4.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"features": x})[0]
    w, b = raw_linear(run)
    assert got.shape == (4, 1) and np.allclose(got[:, 0], x @ w + b, atol=1e-3)


def test_a_table_too_small_to_hold_rows_out_says_how_to_score_it(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "two.csv").write_text("a,b,y\n1,2,3\n2,3,5\n")
    result = cli("train", "--task", "regression", "--data", "two.csv", "--target", "y", "--epochs", "2", "--no-progress", "--out", "run")
    assert result.code == 0, result.err
    assert "(train / val / test 2 / 0 / 0)" in result.out and "test_mse" not in result.out
    assert "no test rows to score: deepfit evaluate run --data OTHER.csv" in result.out


@pytest.mark.parametrize(
    ("data", "env", "message"),
    [
        ("line", {}, "--devices 2: regression runs train in one process; train without --devices"),
        ("karate", {"WORLD_SIZE": "2"}, "torchrun started 2 ranks: node runs train in one process"),
    ],
)
def test_several_ranks_are_refused_for_regression_and_node_runs(  # type: ignore[no-untyped-def]
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: str, env: dict[str, str], message: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    devices = [] if env else ["--devices", "2"]
    result = cli("train", "--data", data, *devices, "--epochs", "1", "--no-progress", "--out", "run")
    assert result.code == 2 and message in result.err and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_predict_with_an_image_for_a_regression_run_says_it_is_no_csv(cli, trained: tuple[Path, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, _ = trained
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x81")
    result = cli("predict", str(run), "photo.png")
    assert result.code == 2 and result.out == "" and result.err.count("\n") == 1
    assert re.fullmatch(
        r"deepfit: error: photo\.png is not a UTF-8 text CSV file; this run predicts \w+ from CSV rows with the columns \w+(, \w+)*\n",
        result.err,
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--topk", "3"], "--topk lists classes; a regression model predicts one value per row"),
        (["--tta", "flip"], "--tta transforms images; a regression model has none"),
    ],
)
def test_predict_refuses_image_flags_for_a_regression_run(  # type: ignore[no-untyped-def]
    cli, trained: tuple[Path, Path], flags: list[str], message: str
) -> None:
    run, table = trained
    result = cli("predict", str(run), str(table), *flags)
    assert result.code == 2 and message in result.err and result.out == ""
    assert cli("predict", str(run), str(table)).code == 0  # the same command without the flag


def test_a_constant_target_stops_in_one_line_before_the_run_folder(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = "\n".join(f"{x},{x * 2},7.5" for x in range(30))
    (tmp_path / "flat.csv").write_text(f"a,b,y\n{rows}\n")
    result = cli("train", "--data", "flat.csv", "--target", "y", "--epochs", "2", "--no-progress", "--out", "run")
    assert result.code == 2 and "the target column 'y' is 7.5 in every training row: there is nothing to learn" in result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_show_with_run_and_figure_swapped_says_the_order(cli, trained: tuple[Path, Path]) -> None:  # type: ignore[no-untyped-def]
    run, _ = trained
    swapped = cli("show", str(run), "curves")
    assert swapped.code == 2 and f"the figure comes first: deepfit show curves {run}" in swapped.err
    assert cli("show", "curves", str(run)).code == 0
    unknown = cli("show", str(run), "filters")  # an image run's figure, swapped: no order to suggest
    assert unknown.code == 2 and "unknown figure 'filters'; valid: curves, predicted, residuals, feature, all" in unknown.err


def test_evaluate_on_another_table_names_the_data_row_it_cannot_read(cli, trained: tuple[Path, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, _ = trained
    (tmp_path / "other.csv").write_text("a,b,y\n1,2,3\n2,3,lots\n")
    result = cli("evaluate", str(run), "--data", "other.csv")
    assert result.code == 2 and "other.csv data row 2: column 'y' has 'lots', not a number" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_r2_of_one_row_is_said_to_be_undefined_and_written_as_json_null(cli, trained: tuple[Path, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = Path(shutil.copytree(trained[0], tmp_path / "run"))  # its report.json is rewritten: the module's run stays as it was
    (tmp_path / "one.csv").write_text("a,b,y\n1,2,3\n")
    result = cli("evaluate", str(run), "--data", "one.csv")
    assert result.code == 0 and "r2 n/a (needs targets that differ)" in result.out
    report = json.loads((run / "report.json").read_text(), parse_constant=lambda token: pytest.fail(f"{token} is not JSON"))
    assert report["r2"] is None and report["rows"] == 1 and report["mse"] >= 0
    assert cli("report", str(run)).code == 0 and "<td>n/a</td>" in (run / "report.html").read_text()


def test_data_info_and_show_take_target_as_train_does(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_table(tmp_path / "table.csv")
    info = cli("data", "info", "table.csv", "--target", "y", "--features", "a,b")
    assert info.code == 0 and info.out.startswith("table.csv: ") and "2 feature(s) -> y" in info.out
    shown = cli("data", "show", "table.csv", "--target", "y", "--out", "look.png")
    assert shown.code == 0 and shown.out.strip() == "look.png"
    from PIL import Image

    with Image.open(tmp_path / "look.png") as image:
        assert image.width > 600 and image.height > 250  # a panel per feature, side by side
    one = cli("data", "show", "table.csv", "--target", "y", "--count", "1", "--out", "one.png")
    with Image.open(tmp_path / "one.png") as image:
        assert one.code == 0 and image.width < 600  # --count 1: the most correlated feature alone


def test_the_image_python_api_refuses_a_regression_run_in_one_line(trained: tuple[Path, Path]) -> None:
    """The command line dispatches by task first; the Python API's image entry points are reached
    directly, and load_run used to fail with an IndexError on the table's input shape."""
    import deepfit
    from deepfit.errors import CheckpointError
    from deepfit.inspect import load_run

    run = trained[0]
    for reach in (load_run, deepfit.Predictor.from_checkpoint, lambda r: deepfit.evaluate_checkpoint(r, write=False)):
        with pytest.raises(CheckpointError, match=r"holds a regression model, not an image classifier"):
            reach(run)


def test_a_regression_run_whose_csv_moved_is_named_and_drawn_from_its_new_place(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    table = write_table(tmp_path / "houses.csv")
    assert cli("train", "--data", "houses.csv", "--target", "y", "--epochs", "3", "--no-progress", "--out", "run").code == 0
    table.rename(tmp_path / "moved.csv")
    for args in (["show", "predicted", "run"], ["evaluate", "run"]):  # they said: /.../houses.csv: no such file
        lost = cli(*args)
        assert lost.code == 2 and lost.err.strip() == (
            f"deepfit: error: no folder or file at {table} (moved or deleted?); a run whose data moved takes its new place"
            " with train --resume RUN --data NEW, evaluate RUN --data NEW or show KIND RUN --data NEW"
        )
    found = cli("show", "predicted", "run", "--data", "moved.csv")
    assert found.code == 0, found.err
    assert found.out.strip() == str(Path("run") / "plots" / "predicted.png")
    assert (tmp_path / "run" / "plots" / "predicted.png").is_file()
