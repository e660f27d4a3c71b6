"""The Python API: deepfit.fit(config) and fit(config, model=my_module); real-data accuracy checks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deepfit
from deepfit.config import Config, set_value
from deepfit.data import BatchLoader, build_data
from deepfit.engine import evaluate, train_one_epoch


def tiny_config(tiny_idx: Path, tmp_path: Path, **overrides: str) -> Config:
    config = Config()
    for key, value in {
        "data.name": "mnist",
        "data.dir": str(tiny_idx),
        "train.epochs": "3",
        "train.out": str(tmp_path / "run"),
        "train.progress": "false",
        **overrides,
    }.items():
        set_value(config, key, value)
    return config


def test_fit_returns_model_history_and_metrics(tiny_idx: Path, tmp_path: Path) -> None:
    result = deepfit.fit(tiny_config(tiny_idx, tmp_path, **{"data.batch_size": "16"}))
    assert isinstance(result.model, nn.Module)
    assert [row["epoch"] for row in result.history] == [1.0, 2.0, 3.0]
    assert {"test_acc", "test_loss", "test_f1"} <= set(result.metrics)
    assert result.metrics["test_acc"] > 0.5  # the bright band makes the tiny set learnable
    assert result.run_dir == tmp_path / "run"


class TwoLayer(nn.Module):
    """A user's own module: nothing deepfit-specific about it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(144, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_fit_trains_any_module(tiny_idx: Path, tmp_path: Path) -> None:
    model = TwoLayer()
    before = model.net[1].weight.detach().clone()
    result = deepfit.fit(tiny_config(tiny_idx, tmp_path, **{"data.batch_size": "16"}), model=model)
    assert result.model is model
    assert not torch.equal(before, model.net[1].weight.detach().cpu())  # trained on the suite's device
    assert result.history[-1]["train_acc"] > result.history[0]["train_acc"] or result.history[-1]["train_acc"] == 1.0


def test_an_optimizer_of_another_module_is_refused_before_the_run_folder(tiny_idx: Path, tmp_path: Path) -> None:
    """It would train nothing: the model would end as it began."""
    from deepfit.errors import ConfigError

    model, other = TwoLayer(), TwoLayer()
    with pytest.raises(ConfigError, match=r"steps 4 parameter tensor\(s\) of another module, none of the model's"):
        deepfit.fit(tiny_config(tiny_idx, tmp_path / "other"), model=model, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    assert not (tmp_path / "other" / "run").exists()
    head = torch.optim.SGD(model.net[-1].parameters(), lr=0.1)  # some of the model's own: fine-tuning a part
    assert deepfit.fit(tiny_config(tiny_idx, tmp_path / "head"), model=model, optimizer=head).history


@pytest.mark.parametrize(
    ("overrides", "task", "function"),
    [({"task": "node"}, "node", "fit_node"), ({"data": "line"}, "regression", "fit_regression"),
     ({"data": {"name": "houses.csv", "target": "price"}}, "regression", "fit_regression")],
)  # fmt: skip
def test_fit_refuses_another_tasks_config_naming_what_trains_it(
    tmp_path: Path, overrides: dict[str, Any], task: str, function: str
) -> None:
    """A node config used to train the digits as images and save a checkpoint that said `node`."""
    from deepfit.errors import ConfigError

    with pytest.raises(ConfigError, match=f"deepfit.fit trains image classifiers; this config is a {task} run: .*{function}\\(config\\)"):
        deepfit.fit(epochs=1, out=str(tmp_path / "run"), progress=False, **overrides)
    assert not (tmp_path / "run").exists()


def test_the_loop_can_be_called_directly(tiny_idx: Path) -> None:
    """engine works with any module and any iterable of (x, y) batches."""
    config = Config()
    set_value(config, "data.name", "mnist")
    set_value(config, "data.dir", str(tiny_idx))
    bundle = build_data(config.data)
    torch.manual_seed(0)
    model = TwoLayer()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    batches = BatchLoader(bundle.train, batch_size=16, mean=bundle.mean, std=bundle.std, device=torch.device("cpu"), shuffle=True)
    first = train_one_epoch(model, batches, optimizer, loss_fn)
    for _ in range(4):
        last = train_one_epoch(model, batches, optimizer, loss_fn)
    assert last["loss"] < first["loss"]
    assert bundle.test is not None
    plain = [(x, y) for x, y in BatchLoader(bundle.test, batch_size=8, mean=bundle.mean, std=bundle.std, device=torch.device("cpu"))]
    assert 0.0 <= evaluate(model, plain, loss_fn)["acc"] <= 1.0


def test_the_loop_reports_no_accuracy_for_a_model_of_one_output() -> None:
    """Regression through the loop (one output, float targets): accuracy is NaN, not a count of
    argmax 0 against argmax 0; class scores against labels are still counted."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    model = nn.Linear(4, 1)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    trained = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss())
    assert math.isnan(trained["acc"]) and trained["loss"] > 0
    assert math.isnan(evaluate(model, batches, nn.MSELoss())["acc"])
    classifier = nn.Linear(4, 3)
    labels = [(x[i : i + 16], torch.arange(16) % 3) for i in range(0, 64, 16)]
    logits = classifier(x[:16]).argmax(1)
    expected = float((logits == torch.arange(16) % 3).float().mean())
    assert evaluate(classifier, labels[:1], nn.CrossEntropyLoss())["acc"] == pytest.approx(expected)


def test_training_is_deterministic(tiny_idx: Path, tmp_path: Path) -> None:
    """Bit-identical on the CPU always; on CUDA with train.deterministic, which this sets."""
    exact = {"train.epochs": "2", "train.deterministic": "true"}
    a = deepfit.fit(tiny_config(tiny_idx, tmp_path / "a", **exact))
    b = deepfit.fit(tiny_config(tiny_idx, tmp_path / "b", **exact))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = deepfit.fit(tiny_config(tiny_idx, tmp_path / "c", **exact, **{"train.seed": "1"}))
    assert not all(torch.equal(sa[k], c.model.state_dict()[k]) for k in sa)


def test_build_data_takes_a_name_as_fit_does() -> None:
    assert build_data(Path("digits")).input_shape == (1, 8, 8)  # a Path as its text: it failed on a missing attribute
    named = build_data("digits")
    configured = build_data(Config().data)  # digits is the default source
    assert named.input_shape == configured.input_shape == (1, 8, 8)
    assert torch.equal(named.train.labels, configured.train.labels) and named.classes == configured.classes


def test_digits_split_is_seeded_and_stratified() -> None:
    bundle = build_data(Config().data)
    again = build_data(Config().data)
    assert bundle.test is not None and again.test is not None and bundle.val is not None
    assert torch.equal(bundle.test.labels, again.test.labels)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 1797
    assert torch.bincount(bundle.test.labels).min() >= 30  # every digit is in the test split
    assert bundle.input_shape == (1, 8, 8)


def test_real_mnist_files_load(mnist_dir: Path) -> None:
    config = Config()
    set_value(config, "data.name", "mnist")
    set_value(config, "data.dir", str(mnist_dir))
    bundle = build_data(config.data)
    assert bundle.test is not None and bundle.val is not None
    assert (len(bundle.train) + len(bundle.val), len(bundle.test)) == (60000, 10000)
    assert abs(len(bundle.val) - 6000) <= 10  # 10% of each class, rounded per class
    assert bundle.mean[0] == pytest.approx(0.1307, abs=2e-3)  # the well-known MNIST statistics
    assert bundle.std[0] == pytest.approx(0.3081, abs=2e-3)


def test_default_run_reaches_97_percent_on_digits(tmp_path: Path) -> None:
    config = Config()
    set_value(config, "train.out", str(tmp_path / "digits"))
    set_value(config, "train.progress", "false")
    result = deepfit.fit(config)
    assert result.metrics["test_acc"] >= 0.97


@pytest.mark.slow
@pytest.mark.parametrize(("name", "target"), [("fashion-mnist", 0.90), ("mnist", 0.985)])
def test_cnn_bn_two_epochs_on_real_data(name: str, target: float, tmp_path: Path) -> None:
    from tests.conftest import real_dataset

    config = Config()
    for key, value in {
        "data.name": name,
        "data.dir": str(real_dataset(name)),
        "model.name": "cnn_bn",
        "train.epochs": "2",
        "train.out": str(tmp_path / name),
        "train.progress": "false",
    }.items():
        set_value(config, key, value)
    assert deepfit.fit(config).metrics["test_acc"] >= target


def test_fit_takes_a_path_for_data_and_refuses_callbacks_that_are_not_functions(tiny_idx: Path, tmp_path: Path) -> None:
    """data=Path(...) failed in len() on the Path; progress="no" or True got as far as the first
    epoch, after the run folder, and failed as 'object is not callable'."""
    from deepfit.errors import ConfigError, DataError

    for bad in ("no", True):
        with pytest.raises(ConfigError, match=f"^fit\\(progress=...\\) takes a function or None, not {type(bad).__name__} {bad!r}$"):
            deepfit.fit(tiny_config(tiny_idx, tmp_path / "bad"), progress=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "bad" / "run").exists()
    with pytest.raises(DataError, match=r"it holds IDX files \(MNIST's format\): name the dataset, --data mnist"):
        deepfit.fit(data=tiny_idx, out=str(tmp_path / "idx"))  # the IDX folder given as if it were class folders
    result = deepfit.fit(data=Path("digits"), epochs=1, out=str(tmp_path / "digits"), progress=False)
    assert result.data.source == "digits" and result.history
