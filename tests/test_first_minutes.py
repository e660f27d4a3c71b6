"""What a new user meets first (issue 13): messages that name the fix, fit(**overrides) checked
like the CLI, the final line of a run without a test split, the per-step learning rate, and class
names in any script in figures and tables."""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import deepfit
from deepfit.columns import display_width, pad
from deepfit.config import config_from_overrides
from deepfit.errors import ConfigError

HANGUL = ["고양이", "비행기"]  # cat, aeroplane


def class_folders(root: Path, classes: list[str], count: int, *, seed: int = 0) -> Path:
    """Class folders of 10x10 PNGs where the class sets which half is bright (learnable)."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 60, size=(10, 10, 3), dtype=np.uint8)
            pixels[:, index * 5 : index * 5 + 5] = 230
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


# --- messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        (["trian"], "invalid choice: 'trian' (did you mean train?)"),
        (["train", "--optim.learning_rate", "0.01"], "unknown option --optim.learning_rate; did you mean --optim.lr?"),
        (["train", "--lr", "0.01"], "did you mean --optim.lr?"),
        (["train", "--data.batchsize", "8"], "did you mean --data.batch_size?"),
        (["train", "--model", "cnn4"], "unknown model 'cnn4' (did you mean cnn3?)"),
        (["train", "--model", "CNN_BN"], "unknown model 'CNN_BN' (did you mean cnn_bn?)"),  # case ignored
        (["evaluate", "run", "--split", "TEST"], "invalid choice: 'TEST' (did you mean test?)"),
        (["train", "--data", "mnst"], "unknown dataset 'mnst' (did you mean mnist?)"),
        (["train", "--optim.name", "adan"], "unknown optimizer 'adan' (did you mean adam?)"),
        (["evaluate", "run", "--split", "tst"], "evaluate: argument --split: invalid choice: 'tst' (did you mean test?)"),
    ],
)
def test_usage_errors_suggest_the_close_match_in_one_line(cli, args: list[str], wanted: str) -> None:  # type: ignore[no-untyped-def]
    result = cli(*args)
    lines = result.err.strip().splitlines()
    assert result.code == 2 and len(lines) == 1, result.err
    assert lines[0].startswith("deepfit: error: ") and "deepfit: error: deepfit" not in lines[0]
    assert wanted in lines[0]


def test_bare_deepfit_prints_help_and_trains_nothing(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli()
    assert result.code == 0 and "usage: deepfit" in result.out and "train" in result.out
    assert not (tmp_path / "runs").exists()


# --- fit(**overrides) -------------------------------------------------------------------------


def test_fit_keywords_save_the_same_config_as_the_cli(cli, tiny_idx: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    flags = ["--data", "mnist", "--data-dir", str(tiny_idx), "--model", "cnn_bn", "--epochs", "1", "--optim.lr", "0.002"]
    assert cli("train", *flags, "--data.batch-size", "32", "--no-progress", "--out", "by-cli").code == 0
    result = deepfit.fit(
        data="mnist", data_dir=str(tiny_idx), model="cnn_bn", epochs=1, optim={"lr": 2e-3},
        **{"data.batch_size": 32, "train.progress": False}, out=str(tmp_path / "by-api"),
    )  # fmt: skip
    assert "test_acc" in result.metrics
    by_cli = yaml.safe_load((tmp_path / "by-cli" / "config.yaml").read_text())
    by_api = yaml.safe_load((tmp_path / "by-api" / "config.yaml").read_text())
    assert by_cli.pop("train").pop("out") != by_api.pop("train").pop("out")
    assert by_cli == by_api


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optim": {"learning_rate": 0.1}}, "unknown config key 'optim.learning_rate'; did you mean optim.lr?"),
        ({"lr": 0.1}, "unknown config key 'lr'; did you mean optim.lr?"),
        ({"epochs": "two"}, "train.epochs must be an integer; got 'two'"),
        ({"optim": {"name": "adan"}}, "'adan' (did you mean adam?)"),
        ({"sched": "cosinus"}, "'cosinus' (did you mean cosine?)"),
    ],
)
def test_fit_keywords_are_checked_like_flags(overrides: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        deepfit.fit(out=str(tmp_path / "run"), **overrides)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


def test_config_from_overrides_copies_and_leaves_the_given_config_alone() -> None:
    base = deepfit.Config()
    changed = config_from_overrides(base, model="mlp", optim={"lr": 0.5})
    assert (changed.model.name, changed.optim.lr) == ("mlp", 0.5)
    assert (base.model.name, base.optim.lr) == ("cnn_bn", 3e-3)


# --- a folder with train/ and val/ but no test/ -----------------------------------------------


def test_a_run_without_a_test_split_ends_with_its_best_validation_result(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    class_folders(tmp_path / "wild" / "train", ["ants", "bees"], 12)
    class_folders(tmp_path / "wild" / "val", ["ants", "bees"], 4, seed=1)
    result = cli("train", "--data", str(tmp_path / "wild"), "--model", "mlp", "--model.hidden", "8", "--epochs", "3", "--out", "run")
    assert result.code == 0, result.err
    lines = result.out.strip().splitlines()
    final = re.fullmatch(r"no test split: best val_acc at epoch (\d): val_acc ([\d.]+)%  val_loss ([\d.]+)", lines[-2])
    assert final is not None, lines[-2]
    with (tmp_path / "run" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    best = max(rows, key=lambda row: float(row["val_acc"]))  # the first of equals, as the line reports
    assert final.group(1) == best["epoch"] and float(final.group(2)) == pytest.approx(100 * float(best["val_acc"]), abs=0.006)
    assert lines[-1] == "run folder: run"
    assert "\r" not in result.out + result.err  # no progress bar when output is not a terminal


# --- the learning rate per step ---------------------------------------------------------------


def test_lr_csv_follows_the_schedule_within_epochs_and_curves_draw_it(tiny_idx: Path, tmp_path: Path) -> None:
    result = deepfit.fit(
        data="mnist", data_dir=str(tiny_idx), model="mlp", epochs=2, out=str(tmp_path / "run"), **{"train.progress": False}
    )
    with (tmp_path / "run" / "lr.csv").open() as handle:
        points = [(int(r["step"]), float(r["epoch"]), float(r["lr"])) for r in csv.DictReader(handle)]
    batches = -(-108 // 128)  # 120 training images less the 10% validation hold-out, batch size 128
    assert [step for step, _, _ in points] == list(range(1, 2 * batches + 1))
    ends = [lr for _, epoch, lr in points if epoch == int(epoch)]
    assert ends == pytest.approx([row["lr"] for row in result.history], rel=1e-5)  # metrics.csv's lr is the epoch's last
    from deepfit.inspect import load_run, make_figure

    figure = make_figure(load_run(tmp_path / "run"), "curves")
    line = figure.axes[2].lines[0]
    assert figure.axes[2].get_title() == "Learning rate (per step)" and list(line.get_ydata()) == pytest.approx([lr for *_, lr in points])


def test_lr_csv_has_one_row_per_batch_and_rises_inside_the_first_epoch(tmp_path: Path) -> None:
    result = deepfit.fit(
        data="digits", model="mlp", epochs=1, out=str(tmp_path / "run"), **{"data.batch_size": 64, "train.progress": False}
    )
    with (tmp_path / "run" / "lr.csv").open() as handle:
        lrs = [float(r["lr"]) for r in csv.DictReader(handle)]
    assert len(lrs) == -(-len(result.data.train) // 64)
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) - 1 and lrs[0] < lrs[peak] > lrs[-1]  # one-cycle: up, then down, inside one epoch


# --- class names in any script ----------------------------------------------------------------


def test_figures_with_hangul_class_names_have_every_glyph() -> None:
    from deepfit import plots

    if not set(plots.FALLBACK_FONTS) & set(plots.matplotlib.rcParams["font.family"]):
        # make test installs koreanize-matplotlib (a dependency), so this runs there; a bare machine
        # (the GPU machines: torch, matplotlib and pytest, no pip) may have no CJK font at all
        pytest.skip("no Hangul font: koreanize-matplotlib is not installed and no Noto CJK or Nanum font is")
    images = np.zeros((2, 1, 8, 8), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font(s)" while drawing
        plots.figure_png(plots.plot_confusion(np.array([[3, 1], [0, 4]]), HANGUL))
        plots.figure_png(plots.plot_samples(images, np.array([0, 1]), HANGUL, title="고양이와 비행기"))
        plots.figure_png(plots.plot_predictions(images, np.array([0, 1]), np.array([1, 1]), HANGUL))


def test_tables_align_by_display_width() -> None:
    assert [display_width(text) for text in ("cat", "고양이", "ｆｕｌｌ", "e\u0301")] == [3, 6, 8, 1]
    rows = [pad(name, 8) + "|" for name in ("cat", "고양이", "비행기")]
    assert {display_width(row) for row in rows} == {9}


def test_evaluate_table_aligns_hangul_class_names(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    class_folders(tmp_path / "photos" / "train", [*HANGUL, "dog"], 10)
    class_folders(tmp_path / "photos" / "test", [*HANGUL, "dog"], 3, seed=1)
    assert cli("train", "--data", str(tmp_path / "photos"), "--model", "mlp", "--epochs", "1", "--out", "run").code == 0
    result = cli("evaluate", "run")
    assert result.code == 0, result.err
    table = [line for line in result.out.splitlines() if line.split(" ")[0] in ("class", *HANGUL, "dog", "macro", "weighted")]
    assert len(table) == 6
    assert len({display_width(line) for line in table}) == 1  # every column ends in the same terminal cell


# --- figures: Grad-CAM's layer, show all, --image, checkpoints that are not ---------------------


def test_grad_cam_skips_layers_whose_maps_are_1x1() -> None:
    import torch

    from deepfit.config import ModelConfig
    from deepfit.inspect import InspectError, grad_cam
    from deepfit.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18"), input_shape=(3, 32, 32), num_classes=4)
    x = torch.rand(2, 3, 32, 32)
    caught: list[torch.Tensor] = []
    model.layer4[1].conv2.register_forward_hook(lambda m, i, out: caught.append(out))
    cam = grad_cam(model, x)
    assert caught[0].shape[2:] == (1, 1)  # the last convolution: one value per channel on 32x32 input
    assert cam.heatmaps.shape == (2, 32, 32) and float(cam.heatmaps.std()) > 0.01  # a map with detail, from an earlier layer
    with pytest.raises(InspectError, match=r"1x1 maps.*pass --layer"):
        grad_cam(model, x, layer="layer4.1.conv2")


def test_show_all_draws_every_figure_it_can_in_one_process(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("train", "--data", "digits", "--model", "mlp", "--model.hidden", "8", "--epochs", "1", "--out", "run").code == 0
    result = cli("show", "all", "run")
    drawn = {Path(line).stem for line in result.out.split()}
    assert drawn == {"curves", "samples", "predictions", "confusion", "mistakes"}
    assert all((tmp_path / "run" / "plots" / f"{kind}.png").stat().st_size > 0 for kind in drawn)
    failed = result.err.strip().splitlines()  # an mlp has no convolution: one line each, the rest still drawn
    assert result.code == 1 and [line.split(":")[1].strip() for line in failed] == ["show filters", "show features", "show gradcam"]
    folder = cli("show", "gradcam", "run", "--image", str(tmp_path))
    assert folder.code == 2 and f"--image {tmp_path} is a folder" in folder.err


def test_a_file_that_is_not_a_checkpoint_says_so(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import torch

    assert cli("train", "--data", "digits", "--model", "mlp", "--model.hidden", "8", "--epochs", "1", "--out", "run").code == 0
    torch.save({"path": Path("x")}, tmp_path / "run" / "pickled-path.pt")  # a pickle that safe loading refuses
    for name in ("metrics.csv", "config.yaml", "plots/curves.png", "pickled-path.pt"):
        result = cli("evaluate", f"run/{name}")
        (line,) = result.err.strip().splitlines()
        assert result.code == 2
        if name.endswith(".pt"):
            assert "refused by safe loading" in line and "PosixPath" in line
        else:
            assert f"run/{name} is not a checkpoint" in line and "pop from" not in line
        assert "weights_only=False" not in line and "Re-running" not in line


def test_an_output_path_the_system_refuses_is_one_line(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An --out under a file (the same as a missing disk or no permission, even for root): the
    path and the system's reason on one line, exit 74 (EX_IOERR), no traceback, nothing written elsewhere."""
    assert cli("train", "--data", "digits", "--model", "mlp", "--model.hidden", "8", "--epochs", "1", "--out", "run").code == 0
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for args in (
        ("data", "show", "digits", "--out", "notes.txt/samples.png"),
        ("report", "run", "--out", "notes.txt/report.html"),
        ("train", "--data", "digits", "--model", "mlp", "--epochs", "1", "--out", "notes.txt/run2"),
    ):
        result = cli(*args)
        (line,) = result.err.strip().splitlines()
        assert result.code == 74 and line.startswith("deepfit: error: notes.txt"), line
        assert line.endswith(("Not a directory", "a file is there, where a folder is needed")), line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_report_captions_name_the_split_the_figures_show(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from deepfit.report import write_report

    class_folders(tmp_path / "wild" / "train", HANGUL, 8)
    class_folders(tmp_path / "wild" / "val", HANGUL, 3, seed=1)
    assert (
        cli("train", "--data", str(tmp_path / "wild"), "--model", "mlp", "--model.hidden", "8", "--epochs", "1", "--out", "run").code == 0
    )
    page = write_report(tmp_path / "run").read_text(encoding="utf-8")
    assert "Confusion matrix (val split)" in page and "Predictions on the val split" in page and "test split" not in page
