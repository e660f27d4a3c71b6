"""The regression task against oracles: least squares on `line`, scikit-learn's closed-form
LinearRegression on `diabetes`, the lesson's own settings, CSV reading, and exact resume."""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deepfit.checkpoint import REQUIRED_KEYS, checkpoint_task, load_checkpoint
from deepfit.config import Config, set_value
from deepfit.errors import DataError
from deepfit.interrupts import SignalStop
from deepfit.regression import default_config, fit_regression
from deepfit.regression.models import regression_metrics
from deepfit.regression.sources import load_table
from deepfit.regression.split import split_rows


def config_for(tmp_path: Path, data: str, **values: Any) -> Config:
    config = default_config()
    set_value(config, "data.name", data)
    set_value(config, "train.out", str(tmp_path / "run"))
    set_value(config, "train.progress", False)
    for key, value in values.items():
        set_value(config, key, value)
    return config


def least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Slopes and intercept (last) minimising the squared error: the closed-form oracle."""
    design = np.c_[x, np.ones(len(x))]
    return np.linalg.lstsq(design, y, rcond=None)[0]


def slope_intercept(result: Any) -> tuple[float, float]:
    """The linear model's line in the data's units (standardisation undone)."""
    s = result.data.scaling
    w, b = result.model.weight[0, 0].item(), result.model.bias[0].item()
    slope = w * s.target_std / s.std[0]
    return slope, s.target_mean + b * s.target_std - slope * s.mean[0]


def train_mse_oracle(result: Any) -> float:
    rows = result.data.train.rows
    x, y = result.data.table.features[rows], result.data.table.target[rows]
    coef = least_squares(x, y)
    return float(np.mean((np.c_[x, np.ones(len(x))] @ coef - y) ** 2))


@pytest.fixture(scope="module")
def line_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`line` with the regression defaults, trained once for the tests that read it."""
    return fit_regression(config_for(tmp_path_factory.mktemp("line"), "line"))


def test_line_slope_and_intercept_match_least_squares(line_run: Any) -> None:
    result = line_run
    rows = result.data.train.rows
    slope, intercept = least_squares(result.data.table.features[rows], result.data.table.target[rows])
    got_slope, got_intercept = slope_intercept(result)
    assert abs(got_slope - slope) < 0.05 and abs(got_intercept - intercept) < 0.05, (got_slope, slope, got_intercept, intercept)
    assert abs(slope - 1.0) < 0.1  # the data really are y = x + noise
    assert (result.run_dir / "plots" / "feature.png").is_file()


def test_diabetes_linear_matches_sklearn_closed_form(tmp_path: Path) -> None:
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    result = fit_regression(config_for(tmp_path, "diabetes"))
    data = result.data
    train, test = data.train.rows, data.test.rows
    reference = LinearRegression().fit(data.table.features[train], data.table.target[train])
    expected = r2_score(data.table.target[test], reference.predict(data.table.features[test]))
    assert abs(result.metrics["test_r2"] - expected) < 0.01, (result.metrics["test_r2"], expected)
    assert len(train) + len(data.val.rows) + len(test) == 442 and not set(train) & set(test)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert all(key in state for key in REQUIRED_KEYS) and checkpoint_task(state) == "regression"
    assert state["classes"] == [] and state["input_shape"] == [10]
    assert state["mean"] == pytest.approx(data.table.features[train].mean(axis=0).tolist())  # training rows only
    assert state["target_mean"] == pytest.approx(float(data.table.target[train].mean()))


def test_lesson_settings_reproduce_the_lesson_and_defaults_converge_sooner(tmp_path: Path, line_run: Any) -> None:
    """The lesson: nn.Linear(1, 1), raw data, full-batch SGD lr 0.001, 100 epochs. The slope is
    learnt within a few epochs, the intercept barely moves (its gradient is 100x smaller than the
    slope's on X ~ N(0, 10^2)), so the loss plateaus above the least-squares optimum."""
    lesson = fit_regression(config_for(tmp_path / "lesson", "line", **{
        "optim.name": "sgd", "optim.lr": 0.001, "optim.momentum": 0, "sched.name": "none", "train.epochs": 100,
        "data.batch_size": 200, "data.standardize": False, "train.restore_best": False,
    }))  # fmt: skip
    defaults = line_run
    optimum = train_mse_oracle(lesson)
    losses = [row["train_mse"] for row in lesson.history]
    assert losses[0] > 5 * optimum and all(b <= a + 1e-9 for a, b in itertools.pairwise(losses))  # falls steadily
    slope, intercept = slope_intercept(lesson)
    ls_slope, ls_intercept = least_squares(
        lesson.data.table.features[lesson.data.train.rows], lesson.data.table.target[lesson.data.train.rows]
    )
    assert abs(slope - ls_slope) < 0.05 and abs(intercept - ls_intercept) > 0.3  # slope found, intercept not
    converged = [int(row["epoch"]) for row in defaults.history if row["train_mse"] <= 1.01 * optimum]
    assert converged and converged[0] <= 20, converged[:1]
    assert all(row["train_mse"] > 1.01 * optimum for row in lesson.history)  # the lesson never gets there in 100


def test_regression_metrics_match_sklearn() -> None:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(0)
    y, p = rng.normal(size=50), rng.normal(size=50)
    got = regression_metrics(torch.from_numpy(p), torch.from_numpy(y))
    assert got["mse"] == pytest.approx(mean_squared_error(y, p)) and got["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, p)))
    assert got["mae"] == pytest.approx(mean_absolute_error(y, p)) and got["r2"] == pytest.approx(r2_score(y, p))


def test_split_is_seeded_and_disjoint() -> None:
    a, b = split_rows(100, test_fraction=0.2, val_fraction=0.1, seed=3), split_rows(100, test_fraction=0.2, val_fraction=0.1, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert sorted(np.concatenate(a).tolist()) == list(range(100)) and [len(s) for s in a] == [72, 8, 20]
    assert not np.array_equal(split_rows(100, test_fraction=0.2, val_fraction=0.1, seed=4)[2], a[2])
    with pytest.raises(DataError, match=r"^only 1 usable row: too few to split into train/val/test; the training split needs at least 2$"):
        split_rows(1, test_fraction=0.2, val_fraction=0.1, seed=3)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


MESSY = "id,size,rooms,city,price\n1,50,2,paris,100\n2,,3,rome,150\n3,70,,paris,\n4,80,4,rome,210\n" + "".join(
    f"{i},{40 + i},{1 + i % 4},{'paris' if i % 2 else 'rome'},{60 + 2 * i}\n" for i in range(5, 30)
)


def test_csv_missing_values_are_named_with_row_counts_or_dropped(tmp_path: Path) -> None:
    config = config_for(tmp_path, str(write_csv(tmp_path / "houses.csv", MESSY)), **{"data.target": "price"})
    with pytest.raises(DataError) as error:
        load_table(config.data)
    message = str(error.value)
    assert "2 rows of 29 have missing values" in message and "size (1 row)" in message and "rooms (1 row)" in message
    assert "price (1 row)" in message and "--data.drop-missing true" in message
    set_value(config, "data.drop_missing", True)
    table = load_table(config.data)
    assert table.dropped_rows == 2 and len(table.target) == 27
    assert table.ignored == ["city"] and table.feature_names == ["id", "size", "rooms"]


def test_csv_text_columns_one_hot_and_non_numeric_target(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "houses.csv.gz", "")
    import gzip

    path.write_bytes(gzip.compress(MESSY.encode()))
    config = config_for(tmp_path, str(path), **{"data.target": "price", "data.drop_missing": True, "data.categorical": "onehot",
                                                "data.features": "size,city"})  # fmt: skip
    table = load_table(config.data)
    assert table.feature_names == ["size", "city=paris", "city=rome"]
    assert table.features[0].tolist() == [50.0, 1.0, 0.0] and table.features[1].tolist() == [80.0, 0.0, 1.0]
    set_value(config, "data.features", "size")
    set_value(config, "data.target", "city")
    with pytest.raises(DataError, match="target column 'city' is not numeric \\('paris' in data row 1\\)"):
        load_table(config.data)
    set_value(config, "data.target", "cost")
    with pytest.raises(DataError, match="no column 'cost'; columns: id, size, rooms, city, price"):
        load_table(config.data)
    set_value(config, "data.target", "Price")
    with pytest.raises(DataError, match="no column 'Price' \\(did you mean price\\?\\); columns: id, size"):
        load_table(config.data)
    set_value(config, "data.target", "price")
    set_value(config, "data.features", "size,price")  # the answer as an input: R^2 1.0
    with pytest.raises(DataError, match="'price' is the target; it cannot be one of the --features too"):
        load_table(config.data)
    set_value(config, "data.features", "size,rooms,size")
    with pytest.raises(DataError, match="--features names 'size' more than once"):
        load_table(config.data)


def test_a_stray_text_cell_in_the_target_is_named_with_its_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "prices.csv", "size,price\n1,3\n2,\n3,x\n4,7\n")
    config = config_for(tmp_path, str(path), **{"data.target": "price"})
    with pytest.raises(DataError, match="target column 'price' is not numeric \\('x' in data row 3\\)"):
        load_table(config.data)


class StopAfter:
    """A progress function that sends this process SIGINT after `batches` batches of epoch `epoch`."""

    def __init__(self, epoch: int, batches: int) -> None:
        self.epoch, self.batches, self.seen = epoch, batches, 0

    def __call__(self, items: Iterable[Any], description: str, total: int) -> Iterable[Any]:
        for i, item in enumerate(items):
            yield item
            if description.startswith(f"epoch {self.epoch}/") and i + 1 == self.batches:
                os.kill(os.getpid(), signal.SIGINT)


def weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def test_resume_mid_epoch_ends_at_the_same_weights(tmp_path: Path) -> None:
    """mlp with dropout on mini-batches: data order, dropout masks and optimizer state all carry over."""
    settings = {"model.name": "mlp", "model.hidden": "16", "model.dropout": 0.2, "data.batch_size": 32, "train.epochs": 4,
                "optim.name": "adam", "optim.lr": 0.01, "sched.name": "onecycle", "train.restore_best": False}  # fmt: skip
    straight = fit_regression(config_for(tmp_path / "a", "diabetes", **settings))
    interrupted = config_for(tmp_path / "b", "diabetes", **settings)
    with pytest.raises(SignalStop):
        fit_regression(interrupted, progress=StopAfter(epoch=2, batches=3))
    saved = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")
    assert saved["epoch"] == 1 and saved["loader"]["epoch"] == 1 and 3 <= saved["loader"]["position"] < 10  # stopped mid-epoch 2
    resumed = fit_regression(load_resumed_config(tmp_path / "b" / "run"), resume=tmp_path / "b" / "run")
    assert weights_hash(resumed.model) == weights_hash(straight.model)
    assert [r["train_mse"] for r in resumed.history] == [r["train_mse"] for r in straight.history]


def test_a_signal_during_the_last_epochs_evaluation_still_stops_the_run(tmp_path: Path) -> None:
    def press(row: dict[str, float]) -> None:
        if row["epoch"] == 3:  # the last epoch: no step boundary follows
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(SignalStop):
        fit_regression(config_for(tmp_path, "diabetes", **{"train.epochs": 3}), on_epoch=press)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 3
    resumed = fit_regression(load_resumed_config(tmp_path / "run"), resume=tmp_path / "run")
    assert len(resumed.history) == 3 and "test_r2" in resumed.metrics


def load_resumed_config(run: Path) -> Config:
    from deepfit.config import config_from_dict

    return config_from_dict(load_checkpoint(run / "checkpoints" / "last.pt")["config"])


def test_a_schema_encodes_json_numbers_and_nulls_as_it_encodes_their_csv_text() -> None:
    from deepfit.regression.table import MissingValue, Schema

    schema = Schema(["a", "rooms", "city"], "y", {"rooms": ["2", "3"], "city": ["n", "s"]})
    as_text = schema.encode({"a": "1.5", "rooms": "3", "city": "s"})
    assert as_text == [1.5, 0.0, 1.0, 0.0, 1.0]
    assert schema.encode({"a": 1.5, "rooms": 3, "city": "s", "extra": [1]}) == as_text  # a one-hot level given as a number
    for cell in (None, float("nan"), float("inf"), "NA", " "):
        with pytest.raises(MissingValue, match="missing value in column 'a'"):
            schema.encode({"a": cell, "rooms": "2", "city": "n"})
    for cell, message in ((True, "column 'a' holds True, not a number or text"), ([1], "holds \\[1\\]"), ("x", "has 'x', not a number")):
        with pytest.raises(ValueError, match=message):
            schema.encode({"a": cell, "rooms": "2", "city": "n"})
    with pytest.raises(MissingValue, match="'city'"):
        schema.encode({"a": 1, "rooms": 2})  # no cell at all
    with pytest.raises(ValueError, match="column 'a' holds a number too large for a float"):
        schema.encode({"a": 10**400, "rooms": 2, "city": "n"})  # JSON's integers have no bound
