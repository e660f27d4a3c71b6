"""`deepfit train`: the run folder it writes, and one clear line (exit 2) for each bad input."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from deepfit.checkpoint import load_checkpoint
from deepfit.config import Config
from deepfit.errors import CheckpointError
from deepfit.fit import fit
from tests.conftest import run_deepfit, write_tiny_idx

TINY = ("--data", "mnist", "--epochs", "2", "--no-progress", "--data.batch-size", "32")


def run_folders(root: Path) -> list[Path]:
    return sorted(p for p in (root / "runs").glob("*") if p.is_dir()) if (root / "runs").exists() else []


def test_train_writes_the_run_folder(cli, tiny_idx: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("train", *TINY, "--data-dir", str(tiny_idx), "--model", "lenet")
    assert result.code == 0, result.err
    (run,) = run_folders(tmp_path)
    for name in ("config.yaml", "metrics.csv", "checkpoints/last.pt", "checkpoints/best.pt", "plots/curves.png"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0])[:7] == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["name"] == "lenet" and saved["train"]["epochs"] == 2
    assert "epoch 2/2" in result.out and "test_acc" in result.out
    first, second = result.out.splitlines()[:2]  # what it trains on, before the first epoch
    said = re.fullmatch(r"data: mnist: 160 images 1x12x12 \(train / val / test (\d+) / (\d+) / 40\), 10 classes", first)
    assert said is not None and int(said[1]) + int(said[2]) == 120 and int(said[2]) > 0 and second.startswith("epoch 1/2")
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["input_shape"] == [1, 12, 12] and len(state["classes"]) == 10


def test_no_temporary_files_are_left_behind(cli, tiny_idx: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("train", *TINY, "--data-dir", str(tiny_idx), "--checkpoint-every", "2").code == 0
    (run,) = run_folders(tmp_path)
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def test_out_names_the_run_folder_and_refuses_to_overwrite(cli, tiny_idx: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("train", *TINY, "--data-dir", str(tiny_idx), "--out", "my-run").code == 0
    assert (tmp_path / "my-run" / "checkpoints" / "last.pt").is_file()
    again = cli("train", *TINY, "--data-dir", str(tiny_idx), "--out", "my-run")
    assert again.code == 2 and "--resume" in again.err


def missing_one_idx_file(tmp_path: Path) -> list[str]:
    folder = write_tiny_idx(tmp_path / "partial")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    return ["--data", "mnist", "--data-dir", str(folder)]


def bad_yaml_key(tmp_path: Path) -> list[str]:
    config = tmp_path / "bad.yaml"
    config.write_text("optim:\n  lr: 0.01\n  momentun: 0.9\n")
    return ["--config", str(config)]


BAD_INPUTS = {
    "data-dir does not exist": (lambda tmp: ["--data", "mnist", "--data-dir", str(tmp / "nowhere")], "does not exist"),
    "folder missing one IDX file": (missing_one_idx_file, "t10k-labels-idx1-ubyte"),
    "unknown model": (lambda tmp: ["--model", "resnet9000"], "valid: "),
    "lr not a number": (lambda tmp: ["--optim.lr", "abc"], "optim.lr must be a number"),
    "unknown yaml key": (bad_yaml_key, "momentun"),
    "unknown dataset": (lambda tmp: ["--data", "imagenet-42"], "unknown dataset"),
    "bad choice": (lambda tmp: ["--device", "tpu"], "auto, cpu, cuda, mps"),
    "stray argument": (lambda tmp: ["--learning-rate", "3"], "unrecognised argument"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_run_folder(case: str, tmp_path: Path) -> None:
    make_args, needle = BAD_INPUTS[case]
    proc = run_deepfit(["train", "--no-progress", *make_args(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepfit: error:"), proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr
    assert run_folders(tmp_path) == []


def test_unknown_model_lists_every_registered_model(cli) -> None:  # type: ignore[no-untyped-def]
    from deepfit.models import list_models

    result = cli("train", "--model", "nope", "--no-progress")
    assert result.code == 2
    assert all(name in result.err for name in list_models())


def test_corrupt_idx_header_is_reported(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = write_tiny_idx(tmp_path / "corrupt", compress=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])  # data shorter than the header declares
    result = cli("train", "--data", "mnist", "--data-dir", str(folder), "--no-progress")
    assert result.code == 2 and "IDX header declares" in result.err


def test_models_lists_the_registry(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("models")
    assert result.code == 0
    assert {"mlp", "lenet", "cnn_bn"} <= set(result.out.split())


def test_no_command_trains_the_default(tmp_path: Path) -> None:
    proc = run_deepfit(["train", "--epochs", "1", "--no-progress"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run,) = run_folders(tmp_path)
    assert run.name.startswith("digits-cnn_bn-")
    state = load_checkpoint(run)
    assert state["input_shape"] == [1, 8, 8]


def test_resume_continues_to_the_configured_epochs(cli, tiny_idx: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("train", *TINY, "--data-dir", str(tiny_idx), "--out", "r").code == 0
    result = cli("train", "--resume", "r", "--epochs", "4", "--no-progress")
    assert result.code == 0, result.err
    assert "epoch 3/4" in result.out and "epoch 1/4" not in result.out
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["epoch"] == 4
    assert len(list(csv.DictReader((tmp_path / "r" / "metrics.csv").open()))) == 4


def test_resume_of_a_missing_run_is_a_clear_error(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("train", "--resume", "not-a-run")
    assert result.code == 2 and "not-a-run" in result.err


def test_resume_after_interruption_ends_at_the_same_weights(cli, tiny_idx: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Copy a mid-run step checkpoint into a fresh folder (as if the run died there) and resume it."""
    args = (*TINY, "--epochs", "3", "--data-dir", str(tiny_idx), "--model", "cnn_bn", "--checkpoint-every", "3", "--keep-last", "20")
    args = (*args, "--train.deterministic", "true")  # the promise on CUDA; on the CPU it holds without it
    assert cli("train", *args, "--out", "full").code == 0
    steps = sorted((tmp_path / "full" / "checkpoints").glob("step-*.pt"))
    assert len(steps) >= 3
    crashed = tmp_path / "crashed" / "checkpoints"
    crashed.mkdir(parents=True)
    shutil.copy(steps[1], crashed / "last.pt")  # a mid-epoch point of epoch 1
    assert load_checkpoint(crashed / "last.pt")["epoch"] < 3
    assert cli("train", "--resume", str(tmp_path / "crashed"), "--no-progress").code == 0
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    resumed = load_checkpoint(crashed / "last.pt")["model"]
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_a_warning_is_one_line_naming_the_problem(cli, tiny_idx: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("train", *TINY, "--data-dir", str(tiny_idx), "--data.augment", "flip-crop")
    assert result.code == 0, result.err
    flips = [line for line in result.err.splitlines() if "flip" in line]
    assert flips == [
        "deepfit: warning: data.augment flip-crop flips images, but a mirrored mnist image may change class; flips stay on as asked"
    ]
    assert ".py:" not in result.err and "UserWarning" not in result.err  # no file:line header, no source line


def test_a_recipe_without_its_data_says_what_it_read_and_why_the_model_cannot_train(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # the CIFAR recipe with --data-dir instead of --data: the config names no dataset, so the
    # embedded 8x8 digits are loaded, which airbench_whiten_small pools away before its head
    config = str(Path(__file__).resolve().parents[1] / "configs" / "cifar10-jpg-85-cpu.yaml")
    result = cli("train", "--config", config, "--data-dir", str(tmp_path), "--no-progress", "--out", "run")
    assert result.code != 0
    lines = result.err.strip().splitlines()
    assert lines[0] == f"deepfit: warning: data.dir {tmp_path} is not read: the dataset is digits, embedded in scikit-learn"
    assert lines[1].startswith("deepfit: error: model airbench_whiten_small cannot take 1x8x8 input: ")
    assert len(lines) == 2 and "Traceback" not in result.err


def test_resume_of_a_folder_without_last_pt_says_to_train_it_anew(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A run stopped before its first checkpoint keeps its config.yaml alone; --resume named
    checkpoints/last.pt as 'no such run folder or checkpoint' of a folder that exists."""
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "config.yaml").write_text("train:\n  epochs: 1\n")
    result = cli("train", "--resume", str(tmp_path / "r"))
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        f"deepfit: error: --resume {tmp_path / 'r'}: it holds no checkpoints/last.pt (a run stopped before its first checkpoint,"
        f" or not a run folder); train it anew with --out {tmp_path / 'r'}"
    ]
    with pytest.raises(CheckpointError, match=r"it holds no checkpoints/last\.pt"):
        fit(Config(), resume=tmp_path / "r")


def test_a_runs_own_config_trained_again_names_where_its_folder_came_from(cli, tiny_idx: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--config RUN/config.yaml records train.out: RUN; the refusal read as if --out had been given."""
    first = cli("train", "--data", "mnist", "--data-dir", str(tiny_idx), "--model", "mlp", "--epochs", "1", "--out", "r", "--no-progress")
    assert first.code == 0, first.err
    again = cli("train", "--config", "r/config.yaml")
    assert again.code == 2
    assert again.err == (
        "deepfit: error: r already holds a run (train.out in r/config.yaml); continue it with --resume r,"
        " or train this config again with --out NEW\n"
    )
    elsewhere = cli("train", "--config", "r/config.yaml", "--out", "r2", "--no-progress")
    assert elsewhere.code == 0 and (tmp_path / "r2" / "checkpoints" / "last.pt").is_file(), elsewhere.err
