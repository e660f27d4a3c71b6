"""Every optimizer and every scheduler through `deepfit train` on the embedded digits (short
runs), the Python API's scheduler objects and lambdas, --model.compile, and resnet18 transfer
options (weights file, frozen backbone, backbone learning rate) end to end."""

from __future__ import annotations

import csv
import functools
import math
import warnings
from pathlib import Path

import numpy
import pytest
import torch
import torchvision

from deepfit.checkpoint import load_checkpoint
from deepfit.config import Config, set_value
from deepfit.data import build_data
from deepfit.errors import ConfigError
from deepfit.fit import fit
from deepfit.history import early_stop_reason
from deepfit.models import build_model
from deepfit.optim import Schedule, ScheduleSpan, build_scheduler, list_losses, list_optimizers, list_schedulers

DIGITS = ("--data", "digits", "--model", "mlp", "--model.hidden", "64", "--no-progress")
LR = 0.01


def rows(run: Path) -> list[dict[str, float]]:
    with (run / "metrics.csv").open() as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


# learning rates at which each optimizer learns the digits in one epoch of batch 32
OPTIMIZER_LR = {"sgd": 0.1, "adam": 3e-3, "adamw": 3e-3, "rmsprop": 1e-3, "adagrad": 0.05, "adadelta": 1.0}


@pytest.mark.parametrize("name", list_optimizers())
def test_every_optimizer_learns_in_one_epoch(name: str, cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli(
        "train", *DIGITS, "--epochs", "1", "--out", "run", "--optim.name", name, "--optim.lr", str(OPTIMIZER_LR[name]),
        "--optim.weight-decay", "1e-4", "--sched.name", "none", "--data.batch-size", "32",
    )  # fmt: skip
    assert result.code == 0, result.err
    (row,) = rows(tmp_path / "run")
    assert math.isfinite(row["train_loss"]) and row["val_acc"] > 0.6, row  # chance is 0.1
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["config"]["optim"]["name"] == name and state["optimizer"]["state"]  # the optimizer kept state


@pytest.mark.parametrize("name", list_losses())
def test_every_loss_learns_in_one_epoch(name: str, cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    args = ("--epochs", "1", "--out", "run", "--loss.name", name, "--data.batch-size", "32", "--sched.name", "none")
    result = cli("train", *DIGITS, *args, "--loss.label-smoothing", "0.1" if name == "cross_entropy" else "0")
    assert result.code == 0, result.err
    (row,) = rows(tmp_path / "run")
    assert row["val_acc"] > 0.6 and 0 < row["val_loss"] < 3, row


def expected_lr_after_epoch_one(name: str) -> float | None:
    """The lr at the end of epoch 1 of 2 (None: only bounds are checked), with the flags below."""
    return {
        "none": LR,
        "step": LR * 0.5,  # step_size 1 epoch, gamma 0.5
        "multistep": LR * 0.5,  # milestone at epoch 1
        "exponential": LR * 0.5,  # gamma 0.5 per epoch
        "cosine": LR / 2,  # half way down to min_lr 0
        "plateau": LR,  # patience 2: no decay yet
        "linear": LR * 2 / 3,  # peaked at a quarter of the steps, a third of the way down to 0
    }.get(name)


@pytest.mark.parametrize("name", list_schedulers())
def test_every_scheduler_through_the_cli(name: str, cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli(
        "train", *DIGITS, "--epochs", "2", "--out", "run", "--optim.lr", str(LR), "--sched.name", name,
        "--sched.step-size", "1", "--sched.milestones", "1", "--sched.gamma", "0.5", "--sched.patience", "2",
    )  # fmt: skip
    assert result.code == 0, result.err
    first, second = rows(tmp_path / "run")
    expected = expected_lr_after_epoch_one(name)
    if expected is not None:
        assert first["lr"] == pytest.approx(expected, rel=1e-6)
    else:  # onecycle: peaked at LR during epoch 1, ends far below it
        assert name == "onecycle"
        assert LR * 0.1 < first["lr"] <= LR and second["lr"] < LR * 0.02  # the lr of a step after the last
    assert math.isfinite(second["train_loss"])


def test_warmup_ramps_linearly_from_a_tenth(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    args = ("--epochs", "1", "--out", "run", "--optim.lr", str(LR), "--sched.name", "none", "--sched.warmup-epochs", "2")
    assert cli("train", *DIGITS, *args).code == 0
    (row,) = rows(tmp_path / "run")
    assert row["lr"] == pytest.approx(LR * (0.1 + 0.9 * 0.5))  # half of the warm-up done


def test_early_stop_ends_the_run_patience_epochs_after_the_best(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """At learning rate 1e-12 no fp32 weight changes, so val_acc never beats epoch 1's."""
    args = (
        "--epochs",
        "5",
        "--out",
        "run",
        "--optim.name",
        "sgd",
        "--optim.lr",
        "1e-12",
        "--sched.name",
        "none",
        "--train.early-stop",
        "1",
    )
    result = cli("train", *DIGITS, *args)
    assert result.code == 0, result.err
    assert [row["epoch"] for row in rows(tmp_path / "run")] == [1, 2]
    assert "stopped early: no val_acc improvement for 1 epoch\n" in result.out


@pytest.mark.parametrize(
    ("epoch", "best", "patience", "reason"),
    [(2, 1, 1, "no val_acc improvement for 1 epoch"), (4, 1, 3, "no val_acc improvement for 3 epochs"), (3, 1, 3, None), (9, 1, 0, None)],
)
def test_early_stop_reason(epoch: int, best: int, patience: int, reason: str | None) -> None:
    assert early_stop_reason("val_acc", epoch, best, patience) == reason


def test_onecycle_max_lr_keeps_the_ratio_of_parameter_groups() -> None:
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.01}], lr=0.1)
    scheduler = build_scheduler("onecycle", optimizer, span=ScheduleSpan(10, 1), max_lr=0.5, pct_start=0.3)
    assert [g["max_lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.05])
    assert scheduler is not None


def test_linear_schedule_is_airbenchs_piecewise_line_per_group_and_leaves_momentum_alone() -> None:
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], lr=1.0, momentum=0.85)
    span = ScheduleSpan(20, 5)  # 100 steps, peak at step 23
    scheduler = build_scheduler("linear", optimizer, span=span, pct_start=0.23, start_factor=0.2, end_factor=0.07)
    assert scheduler is not None
    seen = [[g["lr"] for g in optimizer.param_groups]]
    for _ in range(span.total):
        optimizer.step()
        scheduler.step()
        seen.append([g["lr"] for g in optimizer.param_groups])
        assert [g["momentum"] for g in optimizer.param_groups] == [0.85, 0.85]
    expected = numpy.interp(numpy.arange(span.total + 1), [0, 23, 100], [0.2, 1.0, 0.07])
    assert [lr for lr, _ in seen] == pytest.approx(expected.tolist())
    assert [lr for _, lr in seen] == pytest.approx((0.5 * expected).tolist())


def test_linear_schedule_from_the_command_line_ends_at_its_end_factor(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    flags = ("--sched.name", "linear", "--sched.start-factor", "0.5", "--sched.end-factor", "0.25", "--sched.pct-start", "0.5")
    assert cli("train", *DIGITS, "--epochs", "2", "--out", "run", "--optim.lr", "0.04", *flags).code == 0
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.04 * 0.25)
    assert rows(tmp_path / "run")[0]["lr"] == pytest.approx(0.04)  # the peak, half way


# --- the Python API: scheduler objects, classes, lambdas -----------------------------------


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return build_data(Config().data)


def api_config(tmp_path: Path, name: str, epochs: int = 3) -> Config:
    config = Config()
    for key, value in {
        "model.name": "mlp", "model.hidden": [32], "train.epochs": epochs, "train.progress": False,
        "train.out": str(tmp_path / name), "optim.name": "sgd", "optim.lr": 0.1, "data.batch-size": 256,
    }.items():  # fmt: skip
        set_value(config, key, value)
    return config


def test_api_scheduler_object_is_stepped_per_epoch(tmp_path: Path, digits) -> None:  # type: ignore[no-untyped-def]
    config = api_config(tmp_path, "object")
    model = build_model(config.model, input_shape=digits.input_shape, num_classes=digits.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    result = fit(config, model=model, data=digits, optimizer=optimizer, scheduler=scheduler)
    assert [row["lr"] for row in result.history] == pytest.approx([0.1, 0.05, 0.025])  # lr used in each epoch
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0125) and scheduler.last_epoch == 3


def test_api_lambda_of_the_epoch_becomes_lambdalr(tmp_path: Path, digits) -> None:  # type: ignore[no-untyped-def]
    result = fit(api_config(tmp_path, "lambda"), data=digits, scheduler=lambda epoch: 0.1**epoch)
    assert [row["lr"] for row in result.history] == pytest.approx([0.1, 0.01, 0.001])
    state = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert state["scheduler"]["last_epoch"] == 3  # saved with the run, safely loadable


def test_api_scheduler_class_per_step(tmp_path: Path, digits) -> None:  # type: ignore[no-untyped-def]
    config = api_config(tmp_path, "per-step", epochs=1)
    steps = math.ceil(len(digits.train) / 256)
    factory = functools.partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.5)
    result = fit(config, data=digits, scheduler=Schedule(factory, interval="step"))
    assert result.history[0]["lr"] == pytest.approx(0.1 * 0.5**steps)


def test_api_scheduler_needs_its_optimizer(tmp_path: Path, digits) -> None:  # type: ignore[no-untyped-def]
    model = torch.nn.Linear(2, 2)
    stray = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=0.1), step_size=1)
    with pytest.raises(ConfigError, match="another optimizer"):
        fit(api_config(tmp_path, "stray"), data=digits, scheduler=stray)
    with pytest.raises(ConfigError, match="model= too"):
        fit(api_config(tmp_path, "no-model"), data=digits, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="function of the epoch"):
        fit(api_config(tmp_path, "number"), data=digits, scheduler=0.5)


def test_compile_flag_trains_a_compiled_model_and_saves_it_unwrapped(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    compiled = []
    real_compile = torch.compile

    def compile_eagerly(model, **kwargs):  # type: ignore[no-untyped-def]
        compiled.append(model)
        return real_compile(model, backend="eager")  # dynamo's real tracing, without inductor's C++ build

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    assert cli("train", *DIGITS, "--epochs", "1", "--out", "run", "--model.compile", "true").code == 0
    assert len(compiled) == 1
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["model"] and not any(k.startswith("_orig_mod") for k in state["model"])
    assert cli("evaluate", "run").code == 0  # the checkpoint rebuilds a plain model


@pytest.mark.slow
def test_compile_with_inductor(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("train", *DIGITS, "--epochs", "1", "--out", "run", "--model.compile", "true").code == 0
    assert rows(tmp_path / "run")[0]["val_acc"] > 0.5


# --- resnet18 transfer options end to end -------------------------------------------------------


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    torch.manual_seed(7)
    path = tmp_path / "resnet18-random.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


RESNET = ("--data", "digits", "--model", "resnet18", "--epochs", "1", "--no-progress", "--data.batch-size", "128")


def test_resnet18_feature_extraction_changes_only_the_head(cli, tmp_path: Path, weights_file: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("train", *RESNET, "--out", "frozen", "--model.weights", str(weights_file), "--model.freeze", "backbone")
    assert result.code == 0, result.err
    state = load_checkpoint(tmp_path / "frozen" / "checkpoints" / "last.pt")
    source = torch.load(weights_file, weights_only=True)
    trained = state["model"]
    backbone = [k for k in trained if not k.startswith(("fc.", "conv1."))]
    assert all(torch.equal(trained[k], source[k]) for k in backbone)  # incl. BatchNorm statistics
    assert torch.equal(trained["conv1.weight"], source["conv1.weight"].sum(1, keepdim=True))  # gray digits
    assert trained["fc.weight"].shape == (10, 512)
    (group,) = state["optimizer"]["param_groups"]
    assert len(group["params"]) == 2  # the head's weight and bias only


def test_resnet18_fine_tuning_uses_a_lower_backbone_lr(cli, tmp_path: Path, weights_file: Path) -> None:  # type: ignore[no-untyped-def]
    args = ("--out", "tuned", "--model.weights", str(weights_file), "--model.backbone-lr-scale", "0.1")
    result = cli("train", *RESNET, *args, "--optim.lr", "0.002", "--sched.name", "none")
    assert result.code == 0, result.err
    state = load_checkpoint(tmp_path / "tuned" / "checkpoints" / "last.pt")
    head, backbone = state["optimizer"]["param_groups"]
    assert (head["name"], head["lr"], len(head["params"])) == ("head", 0.002, 2)
    assert backbone["name"] == "backbone" and backbone["lr"] == pytest.approx(0.0002)
    source = torch.load(weights_file, weights_only=True)
    assert not torch.equal(state["model"]["layer4.1.conv2.weight"], source["layer4.1.conv2.weight"])  # it learned


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7])
def test_onecycle_runs_its_whole_span_however_few_steps_there_are(steps: int) -> None:
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = build_scheduler("onecycle", optimizer, span=ScheduleSpan(1, steps), max_lr=None, pct_start=0.25)
    assert scheduler is not None
    lrs = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert all(math.isfinite(lr) and 0 < lr <= 0.1 for lr in lrs)


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepfit import runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert runtime.autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16


def test_auto_precision_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepfit import runtime

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never warns: it picks fp32 where bf16 would be slow
        monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
        assert runtime.autocast_dtype("auto", torch.device("cpu")) is None
        monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
        assert runtime.autocast_dtype("auto", torch.device("cpu")) is torch.bfloat16


def test_norm_lr_scale_steps_norm_parameters_faster_with_the_same_decay_per_step() -> None:
    """optim.norm_lr_scale 64 (airbench's bias_scaler): the norm layers' parameters in a group of
    their own at 64x the lr and 1/64 the weight decay, so one SGD step moves them 64x as far along
    the gradient while the decay per step (lr * decay) is the other weights' own; a Linear's bias
    is not a norm parameter and stays with the weights."""
    from torch import nn

    from deepfit.fitparts import make_optimizer

    config = Config()
    for key, value in {
        "optim.name": "sgd",
        "optim.lr": "0.1",
        "optim.momentum": "0",
        "optim.weight-decay": "0.01",
        "optim.norm-lr-scale": "64",
    }.items():
        set_value(config, key, value)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    norms = {id(p) for index in (1, 3) for p in net[index].parameters()}
    optimizer = make_optimizer(config, net, torch.device("cpu"))
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [("all", 0.1, 0.01), ("all-norm", 6.4, 0.01 / 64)]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == norms and len(optimizer.param_groups[0]["params"]) == 4
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    for name, p in net.named_parameters():
        lr, decay = (6.4, 0.01 / 64) if id(p) in norms else (0.1, 0.01)
        torch.testing.assert_close(p.detach(), before[name] - lr * (1 + decay * before[name]), msg=name)
    set_value(config, "optim.norm-lr-scale", "1")
    assert len(make_optimizer(config, net, torch.device("cpu")).param_groups) == 1  # the default: one group, as before


def test_a_run_with_norm_lr_scale_resumes_to_the_same_weights(tmp_path: Path, tiny_idx: Path) -> None:
    """Two optimizer groups and their momentum buffers come back from the checkpoint (a constant lr:
    a one-epoch run's one-cycle would differ from a two-epoch run's)."""
    config = Config()
    values = {
        "data.name": "mnist", "data.dir": str(tiny_idx), "data.batch-size": "16", "model.name": "cnn_bn", "optim.name": "sgd",
        "optim.lr": "0.05", "optim.weight-decay": "5e-4", "optim.norm-lr-scale": "8", "sched.name": "none", "train.epochs": "2", "train.progress": "false",
        "train.deterministic": "true",
    }  # fmt: skip
    for key, value in values.items():
        set_value(config, key, value)
    straight = fit(config, out=str(tmp_path / "straight"))
    first = fit(config, epochs=1, out=str(tmp_path / "resumed"))
    resumed = fit(config, resume=first.run_dir)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    groups = load_checkpoint(resumed.run_dir / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["all", "all-norm"]
