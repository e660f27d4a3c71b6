"""Issue 12, item 9: every registered optimizer with every registered schedule trains through the
CLI (one short epoch each); a config choice torch rejects is one line, never a traceback."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from deepfit.optim import list_optimizers, list_schedulers

FAST = ["--model", "mlp", "--epochs", "1", "--no-progress", "--data.batch-size", "32", "--train.topk", "3"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import write_tiny_idx

    return write_tiny_idx(tmp_path_factory.mktemp("matrix") / "idx", train=100, test=20)


def train_with(cli, data: Path, optim: str, sched: str, monkeypatch: pytest.MonkeyPatch, *extra: str) -> None:  # type: ignore[no-untyped-def]
    # curves.png is drawn by matplotlib after training (most of a 1-epoch run's time here) and has
    # nothing to do with the optimizer or the schedule: skip only the drawing
    monkeypatch.setattr(importlib.import_module("deepfit.plots"), "save_figure", lambda figure, path: path)
    out = f"run{len(extra)}"
    result = cli(
        "train", "--data", "mnist", "--data-dir", str(data), "--out", out, "--optim.name", optim, "--sched.name", sched, *FAST, *extra
    )
    assert result.code == 0, result.err
    assert "Traceback" not in result.err and "test_acc" in result.out
    assert (Path(out) / "checkpoints" / "last.pt").is_file()


# Every optimizer with the default one-cycle schedule (the one that cycles momentum) and every
# schedule with plain SGD: the everyday pairs, fast. The whole matrix is the slow test below.
QUICK = sorted({(o, "onecycle") for o in list_optimizers()} | {("sgd", s) for s in list_schedulers()})


@pytest.mark.parametrize(("optim", "sched"), QUICK)
def test_every_optimizer_and_every_schedule(cli, tiny_data: Path, optim: str, sched: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    train_with(cli, tiny_data, optim, sched, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("sched", list_schedulers())
@pytest.mark.parametrize("optim", list_optimizers())
def test_the_whole_optimizer_by_schedule_matrix(cli, tiny_data: Path, optim: str, sched: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    train_with(cli, tiny_data, optim, sched, monkeypatch)
    # with a warm-up in front, every schedule but plateau becomes a SequentialLR
    train_with(cli, tiny_data, optim, sched, monkeypatch, "--sched.warmup-epochs", "0.5")


def test_onecycle_cycles_momentum_only_where_the_optimizer_has_one() -> None:
    import torch

    from deepfit.optim import ScheduleSpan, build_optimizer, build_scheduler

    def momentum_cycled(name: str, momentum: float) -> bool:
        optimizer = build_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=momentum)
        scheduler = build_scheduler("onecycle", optimizer, span=ScheduleSpan(10, 1), max_lr=None, pct_start=0.25)
        return bool(scheduler.cycle_momentum)  # type: ignore[union-attr]

    assert momentum_cycled("adam", 0.9) and momentum_cycled("sgd", 0.9) and momentum_cycled("rmsprop", 0.9)
    assert not momentum_cycled("adagrad", 0.9) and not momentum_cycled("adadelta", 0.9)
    assert not momentum_cycled("sgd", 0.0)  # the config turned momentum off: one-cycle leaves it off


def test_a_setting_torch_rejects_is_one_line_naming_it(cli, tiny_data: Path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from deepfit.errors import ConfigError
    from deepfit.fitparts import config_choice
    from deepfit.optim import build_optimizer

    result = cli(
        "train", "--data", "mnist", "--data-dir", str(tiny_data), "--out", "run", "--optim.name", "sgd", "--optim.momentum", "-1", *FAST
    )
    assert result.code == 2 and result.err == "deepfit: error: optim.momentum must be in [0, 1)\n"  # config's check, before torch's
    assert not Path("run").exists()  # no run folder for bad input
    with pytest.raises(ConfigError, match=r"^optim.name sgd: Invalid momentum value: -1.0$"), config_choice("optim.name sgd"):
        build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=-1.0, nesterov=False, weight_decay=0.0)
