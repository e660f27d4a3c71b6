"""`--resume` with a flag that the checkpoint would overrule: the data and its split, the model, the
optimizer and the schedule are restored from the run, so a new value for one of them is refused in
one line before anything is read or written, where it used to be dropped without a word (a new
weight decay or lr), or to fail on the old state (another optimizer, a traceback)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

import deepfit
from deepfit.config import Config, config_from_dict, moved, resume_changes, set_value
from deepfit.errors import ConfigError, DataError

FAST = ("--model", "mlp", "--no-progress", "--data.batch-size", "64", "--epochs", "1")


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_resume_that_changes_the_model_or_the_optimizer_is_refused_and_the_run_is_untouched(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("train", *FAST, "--out", "run").code == 0
    before = snapshot(tmp_path / "run")
    refused = cli("train", "--resume", "run", "--epochs", "2", "--optim.weight-decay", "0.1", "--model", "cnn_bn", "--no-progress")
    assert refused.code == 2 and refused.out == ""
    assert refused.err == (
        "deepfit: error: --resume run cannot change model.name (mlp -> cnn_bn); optim.weight_decay (0.0 -> 0.1): a resumed"
        " run goes on with the data, model, optimizer and schedule it saved; leave them out, or start a new run from its"
        " weights (--init-from run)\n"
    )
    assert snapshot(tmp_path / "run") == before
    # what the run does not restore still applies: clipping in epoch 2
    goes_on = cli("train", "--resume", "run", "--epochs", "2", "--train.clip-grad", "1.0", "--no-progress")
    assert goes_on.code == 0, goes_on.err
    assert "epoch 2/2" in goes_on.out


def test_a_regression_run_is_held_to_what_it_saved(cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("train", "--data", "line", "--epochs", "2", "--no-progress", "--out", "line").code == 0
    lr = cli("train", "--resume", "line", "--epochs", "3", "--optim.lr", "0.5", "--no-progress")
    assert lr.code == 2 and "cannot change optim.lr (0.2 -> 0.5)" in lr.err and lr.err.endswith("or start a new run\n")


def test_a_node_run_is_held_to_what_it_saved(cli) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("torch_geometric", reason="node runs need the graph extra (PyTorch Geometric)")
    assert cli("train", "--task", "node", "--epochs", "2", "--no-progress", "--out", "karate").code == 0
    seed = cli("train", "--resume", "karate", "--epochs", "3", "--train.seed", "1", "--no-progress")
    assert seed.code == 2 and "cannot change train.seed (0 -> 1)" in seed.err


def write_folder(root: Path) -> Path:
    for index, name in enumerate(("dark", "light")):
        (root / name).mkdir(parents=True)
        for i in range(12):
            Image.new("L", (8, 8), 40 + 160 * index + i).save(root / name / f"{i}.png")
    return root


def test_fit_resumes_from_data_that_moved_but_not_onto_other_settings(tmp_path: Path) -> None:
    config = Config()
    for key, value in {"data.name": str(write_folder(tmp_path / "shades")), "model.name": "mlp", "train.epochs": 1,
                       "train.progress": False, "train.out": str(tmp_path / "run"), "data.batch_size": 8}.items():  # fmt: skip
        set_value(config, key, value)
    deepfit.fit(config)
    shutil.move(tmp_path / "shades", tmp_path / "moved")
    with pytest.raises(DataError, match=f"^no folder or file at {tmp_path / 'shades'} \\(moved or deleted\\?\\); .* --data NEW"):
        deepfit.fit(config, resume=tmp_path / "run")  # it said: unknown dataset ..., not a registered name
    set_value(config, "data.name", str(tmp_path / "moved"))
    set_value(config, "train.epochs", 2)
    assert len(deepfit.fit(config, resume=tmp_path / "run").history) == 2
    set_value(config, "sched.name", "cosine")
    with pytest.raises(ConfigError, match=r"cannot change sched\.name \(onecycle -> cosine\)"):
        deepfit.fit(config, resume=tmp_path / "run")


def test_show_draws_a_run_whose_data_moved_from_its_new_place(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_folder(tmp_path / "shades")
    assert cli("train", "--data", "shades", "--model", "mlp", "--epochs", "1", "--no-progress", "--out", "run").code == 0
    shutil.move(tmp_path / "shades", tmp_path / "moved")
    lost = cli("show", "predictions", "run")
    assert lost.code == 2 and lost.err.strip().endswith("or show KIND RUN --data NEW")
    found = cli("show", "predictions", "run", "--data", "moved")
    assert found.code == 0, found.err
    assert (tmp_path / "run" / "plots" / "predictions.png").is_file()
    (tmp_path / "moved" / "grey").mkdir()
    shutil.copy(tmp_path / "moved" / "dark" / "0.png", tmp_path / "moved" / "grey" / "0.png")
    grown = cli("show", "confusion", "run", "--data", "moved")  # a class added since: its figures would misname them
    assert grown.code == 2 and grown.err.strip() == (
        f"deepfit: error: {tmp_path / 'moved'} has the classes dark, grey, light; the run was trained on dark, light:"
        " its figures need the data it was trained on"
    )


def test_resume_refuses_data_whose_classes_changed(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A class folder added: a size mismatch of the last layer. One renamed out of order ('light' to
    'bright', before 'dark'): it went on, each output now trained as the other class."""
    write_folder(tmp_path / "shades")
    assert cli("train", "--data", "shades", "--model", "mlp", "--epochs", "1", "--no-progress", "--out", "run").code == 0
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    (tmp_path / "shades" / "light").rename(tmp_path / "shades" / "bright")
    renamed = cli("train", "--resume", "run", "--epochs", "2", "--no-progress")
    assert renamed.code == 2 and renamed.err.strip() == (
        f"deepfit: error: --resume run: its data {tmp_path / 'shades'} now has the classes bright, dark; the run started"
        " with dark, light. Restore them, or start a new run from its weights with --init-from run"
    )
    (tmp_path / "shades" / "bright").rename(tmp_path / "shades" / "light")
    shutil.copytree(tmp_path / "shades" / "dark", tmp_path / "shades" / "grey")
    added = cli("train", "--resume", "run", "--epochs", "2", "--no-progress")
    assert added.code == 2 and "now has the classes dark, grey, light; the run started with dark, light" in added.err
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before
    shutil.rmtree(tmp_path / "shades" / "grey")
    assert cli("train", "--resume", "run", "--epochs", "2", "--no-progress").code == 0


def test_resume_changes_names_each_fixed_key_and_lets_the_rest_through(tmp_path: Path) -> None:
    saved = Config()
    config = config_from_dict(saved.to_dict())
    for key, value in {"train.epochs": 9, "train.ema": 0.99, "data.eval_batch_size": 7, "train.precision": "bf16", "data.dir": "x"}.items():
        set_value(config, key, value)
    assert resume_changes(saved, config) == []
    set_value(config, "optim.betas", [0.8, 0.99])
    set_value(config, "data.val_fraction", 0.2)
    set_value(config, "train.accumulate", 2)
    assert resume_changes(saved, config) == [
        "data.val_fraction (0.1 -> 0.2)",
        "train.accumulate (1 -> 2)",
        "optim.betas ([0.9, 0.999] -> [0.8, 0.99])",
    ]


def test_a_data_path_may_be_written_otherwise_or_moved_but_a_dataset_is_a_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    assert moved(str(tmp_path / "photos"), "photos") and not moved(str(tmp_path / "photos"), str(tmp_path))
    assert moved(str(tmp_path / "gone"), "photos")  # a saved absolute path that is no longer there
    assert not moved("digits", "mnist") and not moved("digits", "photos")
