"""`deepfit lr-find`: an exponential sweep that stops on divergence, suggests a finite lr,
draws its plot, and leaves the caller's model and the global random state untouched."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfit.config import Config, set_value
from deepfit.data import build_data
from deepfit.errors import ConfigError
from deepfit.lrfind import find_lr, save_lr_find
from deepfit.models import build_model


def digits_config(**overrides: object) -> Config:
    config = Config()
    for key, value in {"model.name": "cnn_bn", "data.batch-size": 64, **overrides}.items():
        set_value(config, key, value)
    return config


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return build_data(Config().data)


def test_sweep_leaves_the_model_byte_identical_and_suggests_a_finite_lr(digits) -> None:  # type: ignore[no-untyped-def]
    config = digits_config()
    torch.manual_seed(3)
    model = build_model(config.model, input_shape=digits.input_shape, num_classes=digits.num_classes)
    before = {k: v.clone().numpy().tobytes() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = find_lr(config, model=model, data=digits, start_lr=1e-6, end_lr=10.0, steps=60)
    assert {k: v.numpy().tobytes() for k, v in model.state_dict().items()} == before  # BatchNorm buffers too
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert math.isfinite(result.suggestion) and 1e-6 <= result.suggestion <= 10.0
    assert result.suggestion == pytest.approx(result.lrs[int(np.argmin(result.smoothed))] / 10)
    ratios = np.diff(np.log(result.lrs))  # exponential: a constant step in log(lr)
    assert ratios == pytest.approx(np.full(len(ratios), math.log(1e7) / 59), rel=1e-6)
    assert result.smoothed[-1] > min(result.smoothed)  # the loss came down, then up again
    assert min(result.smoothed) < result.smoothed[0] * 0.8


def test_sweep_stops_when_the_loss_diverges(digits) -> None:  # type: ignore[no-untyped-def]
    config = digits_config(**{"optim.name": "sgd", "model.name": "mlp"})
    result = find_lr(config, data=digits, start_lr=1e-3, end_lr=1e6, steps=100)
    assert result.stopped in ("diverged", "non-finite loss")
    assert len(result.lrs) < 100 and all(math.isfinite(v) for v in result.smoothed)
    assert 1e-3 <= result.suggestion < result.lrs[-1]


def test_same_seed_same_sweep(digits) -> None:  # type: ignore[no-untyped-def]
    config = digits_config(**{"model.name": "mlp"})
    a = find_lr(config, data=digits, steps=30)
    b = find_lr(config, data=digits, steps=30)
    assert a.losses == b.losses and a.suggestion == b.suggestion


def test_bad_ranges_are_config_errors(digits) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="start lr < end lr"):
        find_lr(digits_config(), data=digits, start_lr=1.0, end_lr=0.1)
    with pytest.raises(ConfigError, match="at least"):
        find_lr(digits_config(), data=digits, steps=5)


def test_your_own_module_that_does_not_fit_the_data_is_one_line(digits) -> None:  # type: ignore[no-untyped-def]
    """As in fit: a module of 5 outputs for 10 classes said 'Target 9 is out of bounds' mid-sweep."""
    five = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    with pytest.raises(ConfigError, match=r"returns shape \(2, 5\) for a batch of 2 1x8x8 images; deepfit needs \(2, 10\)"):
        find_lr(digits_config(), model=five, data=digits, steps=20)


def test_save_writes_the_plot_and_the_table(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = find_lr(digits_config(**{"model.name": "mlp"}), data=digits, steps=40)
    png, table = save_lr_find(result, tmp_path / "out")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(result.lrs) and float(rows[0]["lr"]) == pytest.approx(result.lrs[0], rel=1e-5)


def test_cli_lr_find(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("lr-find", "--data", "digits", "--model", "mlp", "--steps", "50", "--start-lr", "1e-5", "--out", "sweep")
    assert result.code == 0, result.err
    suggested = float(re.search(r"suggested lr (\S+)", result.out).group(1))  # type: ignore[union-attr]
    assert 1e-5 <= suggested <= 10
    assert f"--optim.lr {suggested:.3g}" in result.out
    assert (tmp_path / "sweep" / "lr-find.png").is_file() and (tmp_path / "sweep" / "lr-find.csv").is_file()
    bad = cli("lr-find", "--data", "digits", "--start-lr", "1", "--end-lr", "0.5")
    assert bad.code == 2 and "start lr < end lr" in bad.err


def test_train_only_flags_are_refused_not_ignored(cli) -> None:  # type: ignore[no-untyped-def]
    """--devices 2, --epochs, --log ... were taken by lr-find's parser (it shares train's) and ignored."""
    result = cli("lr-find", "--data", "digits", "--devices", "2", "--epochs", "3", "--log", "mlflow")
    assert result.code == 2
    assert (
        result.err
        == "deepfit: error: --epochs, --devices, --log: not used by lr-find, which sweeps --steps batches in one process; leave them out\n"
    )


@pytest.mark.slow
@pytest.mark.data
def test_fashion_mnist_suggestion_trains_well(cli, fashion_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The suggested lr (Adam, one-cycle, cnn_bn) reaches 88% test accuracy in one epoch."""
    common = ("--data", "fashion-mnist", "--data-dir", str(fashion_dir), "--model", "cnn_bn", "--no-progress")
    found = cli("lr-find", *common, "--out", "sweep")
    assert found.code == 0, found.err
    suggested = re.search(r"suggested lr (\S+)", found.out).group(1)  # type: ignore[union-attr]
    trained = cli("train", *common, "--epochs", "1", "--optim.lr", suggested, "--out", "run")
    assert trained.code == 0, trained.err
    accuracy = float(re.search(r"test_acc ([\d.]+)%", trained.out).group(1))  # type: ignore[union-attr]
    assert accuracy > 88.0, f"lr {suggested}: {accuracy}%"
