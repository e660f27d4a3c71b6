"""Issue 12, item 7: extending a run (`train --resume RUN --epochs N`) rebuilds its schedule for N
epochs from the step it stands at, and every resume says where it picks up."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from deepfit.checkpoint import load_checkpoint
from tests.conftest import write_tiny_idx

FAST = ("--model", "mlp", "--no-progress", "--data.batch-size", "32", "--train.topk", "3")


def lrs(run: Path) -> list[float]:
    with (run / "metrics.csv").open() as handle:
        return [float(row["lr"]) for row in csv.DictReader(handle)]


@pytest.mark.parametrize("sched", ["onecycle", "cosine"])
def test_extending_a_finished_run_follows_the_schedule_built_for_the_new_length(cli, tmp_path: Path, sched: str) -> None:  # type: ignore[no-untyped-def]
    data = ("--data", "mnist", "--data-dir", str(write_tiny_idx(tmp_path / "idx", train=100, test=20)), "--sched.name", sched)
    assert cli("train", *data, *FAST, "--epochs", "2", "--out", "short").code == 0
    assert cli("train", *data, *FAST, "--epochs", "4", "--out", "long").code == 0  # the oracle: planned for 4 from the start
    extended = cli("train", "--resume", "short", "--epochs", "4", "--no-progress")
    assert extended.code == 0, extended.err
    steps = int(load_checkpoint(tmp_path / "long" / "checkpoints" / "last.pt")["step"]) // 2  # two epochs' worth
    assert f"resuming short at epoch 3, step {steps}" in extended.out
    assert f"the {sched} schedule was planned for 2 epochs: rebuilt for 4, from step {steps}" in extended.out
    assert lrs(tmp_path / "short")[2:] == pytest.approx(lrs(tmp_path / "long")[2:], rel=1e-6)  # not restarted, not stuck


def test_a_plain_resume_says_where_it_picks_up(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = ("--data", "mnist", "--data-dir", str(write_tiny_idx(tmp_path / "idx", train=100, test=20)))
    assert cli("train", *data, *FAST, "--epochs", "1", "--out", "run").code == 0
    again = cli("train", "--resume", "run", "--epochs", "1", "--no-progress")
    assert again.code == 0 and "resuming run: it has trained 1 epoch, nothing left to train for --epochs 1" in again.out
