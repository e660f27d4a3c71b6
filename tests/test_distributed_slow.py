"""Data-parallel training (issue 14), the long journeys (`make test-slow`): real data, SyncBatchNorm,
a rank killed through the real launcher, resume on another number of ranks, two "nodes" on
localhost and `--resume auto` across preemptions. Every process is ended in a `finally`."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from deepfit.errors import StopRequested
from deepfit.fit import fit
from deepfit.launch import world_change_note
from tests.ranks import (
    deepfit_process,
    digits_config,
    end_tree,
    free_port,
    max_diff,
    rank_pid,
    run_ranks,
    stop_after,
    wait_for,
    weights,
)

pytestmark = pytest.mark.slow
CLI_RUN = ["train", "--data", "digits", "--model", "mlp", "--epochs", "3", "--device", "cpu", "--no-progress", "--data.batch-size", "32"]


@pytest.mark.data
def test_lenet_fashion_mnist_two_ranks_within_0_3_points(fashion_dir: Path, tmp_path: Path) -> None:
    """One epoch of lenet on Fashion-MNIST: the test accuracy of 2 ranks within 0.3 points of 1 process."""
    from deepfit import evaluate_checkpoint

    overrides = {"data__name": "fashion-mnist", "data__dir": str(fashion_dir), "model__name": "lenet", "train__epochs": 1}
    one = fit(digits_config(tmp_path / "one", **overrides))
    assert run_ranks(2, digits_config(tmp_path / "two", **overrides), timeout=1200) == [0, 0]
    two = evaluate_checkpoint(tmp_path / "two").report.accuracy
    assert abs(two - one.metrics["test_acc"]) < 0.003, (two, one.metrics["test_acc"])


def bn_net() -> nn.Module:
    """Conv-BatchNorm without dropout (cnn_bn's dropout draws a different mask per rank), seeded. The
    conv has no bias: BatchNorm cancels it, so its gradient is float noise, which Adam would turn
    into full-size steps that differ between any two summation orders."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)
    )


def test_sync_batchnorm_matches_one_process(tmp_path: Path) -> None:
    """BatchNorm over the global batch: with train.sync_bn two ranks follow the single process
    (float differences only: the statistics are sums of per-rank partial sums), the odd last batch
    included; without it each rank normalises with its half batch's statistics and drifts away."""
    one = digits_config(tmp_path / "one", train__epochs=2, data__batch_size=64)
    fit(one, model=bn_net())
    sync = digits_config(tmp_path / "sync", train__epochs=2, data__batch_size=64, train__sync_bn=True)
    assert run_ranks(2, sync, build=bn_net) == [0, 0]
    assert run_ranks(2, digits_config(tmp_path / "local", train__epochs=2, data__batch_size=64), build=bn_net) == [0, 0]
    synced = max_diff(weights(tmp_path / "one"), weights(tmp_path / "sync"))
    local = max_diff(weights(tmp_path / "one"), weights(tmp_path / "local"))
    assert synced < 1e-4, synced
    assert local > 100 * synced, (local, synced)


def test_cnn_bn_with_sync_batchnorm_scores_like_one_process(tmp_path: Path) -> None:
    """The registered cnn_bn has dropout, whose masks each rank draws for its own rows: weights
    cannot match, the scores must (3 epochs on the digits, validation accuracy within 3 points)."""
    fit(digits_config(tmp_path / "one", model__name="cnn_bn", data__batch_size=64))
    assert run_ranks(2, digits_config(tmp_path / "sync", model__name="cnn_bn", data__batch_size=64, train__sync_bn=True)) == [0, 0]
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)["history"][-1]["val_acc"]
    two = torch.load(tmp_path / "sync" / "checkpoints" / "last.pt", weights_only=True)["history"][-1]["val_acc"]
    assert abs(one - two) < 0.03, (one, two)


def test_killed_rank_ends_the_job_and_resume_finishes_like_a_straight_run(tmp_path: Path) -> None:
    """`deepfit train --devices 2`; SIGKILL rank 1 mid-epoch: the launcher ends within 60 s naming
    rank 1; `--resume` with 2 ranks ends at the weights of an uninterrupted 2-rank run."""
    args = [*CLI_RUN, "--out", "run", "--checkpoint-every", "5", "--keep-last", "1000", "--devices", "2"]
    launcher = deepfit_process(args, cwd=tmp_path)
    try:
        wait_for(tmp_path / "run" / "checkpoints" / "step-00000005.pt", 300, launcher)
        os.kill(rank_pid(launcher, 1), signal.SIGKILL)
        killed = time.monotonic()
        _, err = launcher.communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        end_tree(launcher)
    assert launcher.returncode == 1
    assert "rank 1" in err and "SIGKILL" in err, err[-2000:]
    resumed = deepfit_process(["train", "--resume", "run", "--devices", "2", "--no-progress"], cwd=tmp_path)
    try:
        _, err = resumed.communicate(timeout=600)
    finally:
        end_tree(resumed)
    assert resumed.returncode == 0, err[-2000:]
    assert run_ranks(2, digits_config(tmp_path / "straight", data__batch_size=32)) == [0, 0]
    assert max_diff(weights(tmp_path / "run"), weights(tmp_path / "straight")) < 1e-6


def test_sigterm_to_the_launcher_stops_every_rank_with_a_checkpoint(tmp_path: Path) -> None:
    launcher = deepfit_process([*CLI_RUN, "--epochs", "30", "--out", "run", "--devices", "2"], cwd=tmp_path)
    try:
        wait_for(tmp_path / "run" / "metrics.csv", 300, launcher)  # one epoch done
        os.kill(launcher.pid, signal.SIGTERM)
        _, err = launcher.communicate(timeout=60)
    finally:
        end_tree(launcher)
    assert launcher.returncode == 143, err[-2000:]
    assert "resume with: deepfit train --resume run" in err, err[-3000:]  # the whole tail, should it ever fail again
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["loader"]["position"] > 0 or state["epoch"] >= 1


def test_resume_two_ranks_on_one_process_and_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-rank run stopped mid-epoch (SIGTERM after step 10 of 21) resumes on 1 process, and a
    1-process run stopped the same way (after step 20) resumes on 2 ranks; both end at the weights
    of a straight run."""
    fit(digits_config(tmp_path / "straight", data__batch_size=64))
    run_ranks(2, digits_config(tmp_path / "two-one", data__batch_size=64), stop_at=10)
    assert torch_step(tmp_path / "two-one") == 12  # step 11 votes to stop; its answer is read after step 12, on both ranks
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert world_change_note(tmp_path / "two-one") == "resuming a run saved by 2 rank(s) on 1: same global batch size, same data order"
    fit(digits_config(tmp_path / "two-one", data__batch_size=64), resume=tmp_path / "two-one")
    assert max_diff(weights(tmp_path / "straight"), weights(tmp_path / "two-one")) < 1e-5

    with pytest.raises(StopRequested):
        fit(digits_config(tmp_path / "one-two", data__batch_size=64), progress=stop_after(20))
    assert torch_step(tmp_path / "one-two") == 21
    assert run_ranks(2, digits_config(tmp_path / "one-two", data__batch_size=64), resume=str(tmp_path / "one-two")) == [0, 0]
    assert max_diff(weights(tmp_path / "straight"), weights(tmp_path / "one-two")) < 1e-5


def torch_step(run: Path) -> int:
    return int(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"])


def test_two_nodes_on_localhost_train_like_one_node(tmp_path: Path) -> None:
    port = free_port()
    nodes = []
    try:
        for node in (0, 1):
            launcher = ["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1"]
            launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"]
            nodes.append(deepfit_process([*CLI_RUN, "--out", "run"], cwd=tmp_path, launcher=launcher))
        results = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            end_tree(node)
    assert [node.returncode for node in nodes] == [0, 0], [err[-1500:] for _, err in results]
    assert run_ranks(2, digits_config(tmp_path / "one-node", data__batch_size=32)) == [0, 0]
    assert max_diff(weights(tmp_path / "run"), weights(tmp_path / "one-node")) < 1e-6


def test_resume_auto_across_preemptions(tmp_path: Path) -> None:
    """The same command, re-run after each kill: killed before its run folder existed, killed after
    a step checkpoint, then run to the end; it ends at the weights of an uninterrupted run."""
    command = [*CLI_RUN, "--out", "run", "--resume", "auto", "--checkpoint-every", "10", "--keep-last", "1000"]
    first = deepfit_process(command, cwd=tmp_path)
    try:
        time.sleep(0.5)  # still importing torch: no run folder yet
    finally:
        end_tree(first)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    second = deepfit_process(command, cwd=tmp_path)
    try:
        wait_for(tmp_path / "run" / "checkpoints" / "step-00000010.pt", 300, second)
    finally:
        end_tree(second)
    assert torch_step(tmp_path / "run") >= 10
    third = deepfit_process(command, cwd=tmp_path)
    try:
        out, err = third.communicate(timeout=600)
    finally:
        end_tree(third)
    assert third.returncode == 0, err[-2000:]
    assert "run folder: run" in out
    fit(digits_config(tmp_path / "straight", data__batch_size=32))
    assert max_diff(weights(tmp_path / "run"), weights(tmp_path / "straight")) < 1e-5
