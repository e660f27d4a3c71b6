"""Data-parallel training (issue 14), the quick share: N ranks on gloo see exactly what one process
sees. Ranks are forked from the test process on a free 127.0.0.1 port, with time limits, and
killed when a test ends; the long journeys are in test_distributed_slow.py."""

from __future__ import annotations

import csv
import math
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from deepfit.data import BatchLoader, ImageSet
from deepfit.data.loader import share_rows
from deepfit.fit import fit
from deepfit.launch import available_cores, describe_failure, rank_threads, resolve_resume, without_devices
from tests.conftest import run_deepfit
from tests.ranks import deepfit_process, digits_config, end_tree, forked_ranks, max_diff, run_ranks, wait_for, weights


def test_share_rows_cover_every_row_once() -> None:
    for total in range(0, 23):
        for size in (1, 2, 3, 5):
            rows = [share_rows(total, rank, size) for rank in range(size)]
            covered = [i for part in rows for i in range(part.start, part.stop)]
            assert covered == list(range(total))
            assert max(p.stop - p.start for p in rows) - min(p.stop - p.start for p in rows) <= 1


@pytest.mark.parametrize(("flip", "pad_mode"), [("random", "constant"), ("alternate", "reflect")])
def test_shards_of_augmented_batches_equal_the_single_process_batch(flip: str, pad_mode: str) -> None:
    """Two ranks' shards of every global batch, augmented with flips and crops, are the rows of
    the batch one process gets: same order, same random draws, the odd last batch included, over
    two epochs (alternate flips change sides between them)."""
    generator = torch.Generator().manual_seed(1)
    data = ImageSet(torch.randint(0, 256, (37, 1, 8, 8), dtype=torch.uint8, generator=generator), torch.arange(37))
    common = {
        "batch_size": 10,
        "mean": (0.5,),
        "std": (0.25,),
        "device": torch.device("cpu"),
        "shuffle": True,
        "augment": "flip-crop",
        "seed": 3,
        "flip": flip,
        "pad_mode": pad_mode,
    }
    one = BatchLoader(data, **common)
    single = [batch for _ in range(2) for batch in one]
    ranks = []
    for rank in range(2):
        loader = BatchLoader(data, **common)
        loader.shard = (rank, 2)
        ranks.append([batch for _ in range(2) for batch in loader])
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 8
    for whole, first, second in zip(single, ranks[0], ranks[1], strict=True):
        assert torch.equal(whole[0], torch.cat([first[0], second[0]]))
        assert torch.equal(whole[1], torch.cat([first[1], second[1]]))


def test_two_ranks_train_the_weights_of_one_process(tmp_path: Path) -> None:
    """mlp (no BatchNorm) on the digits, 3 epochs: 2 ranks x half of each global batch of 100
    (an odd last batch, split unevenly) vs 1 process: weights within 1e-5, the same sharded
    validation and test scores, and one run folder written by rank 0."""
    one = fit(digits_config(tmp_path / "one", data__batch_size=100))
    images = len(one.data.train)
    assert images % 100 % 2 == 1, f"{images} training images: the last batch should not split evenly"
    assert run_ranks(2, digits_config(tmp_path / "two", data__batch_size=100)) == [0, 0]
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5
    rows = list(csv.DictReader((tmp_path / "two" / "metrics.csv").open()))
    assert [float(r["val_acc"]) for r in rows] == pytest.approx([row["val_acc"] for row in one.history], abs=1e-6)  # csv keeps 6 digits
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([row["train_loss"] for row in one.history], rel=1e-5)
    saved = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["world_size"] == 2 and saved["step"] == 3 * -(-images // 100)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


class StemStops(nn.Module):
    """A model whose own per-epoch hook stops its first layer's bias learning after epoch 1."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(64, 32)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x.flatten(1)))

    def on_train_epoch_start(self, epoch: int) -> None:
        self.stem.bias.requires_grad_(epoch < 1)


def stem_stops() -> nn.Module:
    torch.manual_seed(0)
    return StemStops()


def test_two_ranks_follow_a_model_hook_that_stops_a_parameter(tmp_path: Path) -> None:
    """A parameter that stops learning mid-run is unused to DDP from then on: the ranks neither hang
    nor fail waiting for its gradient, and end with the weights of one process (bias included)."""
    model = stem_stops()
    biases: list[torch.Tensor] = []
    fit(
        digits_config(tmp_path / "one", data__batch_size=100),
        model=model,
        on_epoch=lambda row: biases.append(model.stem.bias.detach().clone()),
    )
    assert run_ranks(2, digits_config(tmp_path / "two", data__batch_size=100), build=stem_stops, timeout=300) == [0, 0]
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5
    assert torch.equal(biases[0], biases[2]) and not torch.equal(biases[0], stem_stops().stem.bias)  # learned in epoch 1 only


class MasksOnRank1(nn.Module):
    """An MLP whose 3rd training forward on rank 1 masks every class but the last with -inf, as a
    class mask does: that rank's loss is inf while every gradient stays finite (softmax minus
    one-hot), so after DDP's all-reduce only rank 1's own guard has seen the fault."""

    BAD = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.calls, self.rank = 0, int(os.environ.get("RANK", "0"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        if self.training:
            self.calls += 1
            if self.rank == 1 and self.calls == self.BAD:
                return logits.masked_fill(torch.arange(10) < 9, -math.inf)
        return logits


def test_a_fault_on_one_rank_stops_every_rank_before_anything_is_saved_after_it(tmp_path: Path) -> None:
    """The ranks agree when they read the guard: both stop with rank 1's message at the step
    checkpoint that follows the fault, and rank 0 writes none after it (its own guard saw nothing)."""
    config = digits_config(tmp_path / "run", data__batch_size=100, train__epochs=1, train__checkpoint_every=1, train__keep_last=1000)
    assert run_ranks(2, config, build=MasksOnRank1, timeout=300) == [3, 3]
    messages = {(tmp_path / "run" / f"rank-{rank}.stopped").read_text() for rank in range(2)}
    assert len(messages) == 1 and messages.pop().startswith(f"the loss became inf at batch {MasksOnRank1.BAD} on rank 1;")
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.glob("step-*.pt")) == [f"step-{s:08d}.pt" for s in range(1, MasksOnRank1.BAD)]
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == MasksOnRank1.BAD - 1


def test_a_signal_stops_every_rank_after_the_step_that_reads_its_vote(tmp_path: Path) -> None:
    """SIGTERM to both ranks after step 4 of 13: step 5 votes to stop while step 6 trains, and
    both ranks stop after step 6 with exit code 143 and a checkpoint of step 6 (no step waits
    for a vote's answer)."""
    config = digits_config(tmp_path / "run", data__batch_size=100, train__epochs=2)
    assert run_ranks(2, config, stop_at=4, timeout=300) == [143, 143]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 6


def test_a_killed_rank_does_not_hang_the_other(tmp_path: Path) -> None:
    """SIGKILL rank 1 after the first step checkpoint: rank 0 ends with an error well within 60 s
    instead of waiting for its peer, and the checkpoint it left is complete and loadable."""
    config = digits_config(tmp_path / "run", data__batch_size=32, train__epochs=20, train__checkpoint_every=5, train__keep_last=1000)
    with forked_ranks(2, config) as procs:
        wait_for(tmp_path / "run" / "checkpoints" / "step-00000005.pt", 120)
        os.kill(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        procs[0].join(60)
        assert not procs[0].is_alive(), "rank 0 hung after its peer died"
        assert procs[0].exitcode not in (0, None)
        assert time.monotonic() - killed < 60
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] >= 5 and state["step"] % 5 == 0


def test_failure_names_the_killed_rank() -> None:
    class Failure:
        def __init__(self, exitcode: int, pid: int) -> None:
            self.exitcode, self.pid = exitcode, pid

    code, message = describe_failure({0: Failure(-15, 100), 1: Failure(-9, 101)})  # rank 0: the agent's SIGTERM
    assert code == 1 and message.startswith("rank 1 (pid 101) was killed by SIGKILL; rank 0 was stopped")
    code, message = describe_failure({0: Failure(1, 100), 1: Failure(-15, 101), 2: Failure(-15, 102)})
    assert code == 1 and message.startswith("rank 0 (pid 100) exited with code 1; ranks 1, 2 were stopped")
    code, message = describe_failure({0: Failure(2, 100), 1: Failure(2, 101), 2: Failure(-15, 102)})
    assert (code, message) == (2, "ranks 0, 1 exited with code 2; rank 2 was stopped. The error above names what to fix")
    code, message = describe_failure({0: Failure(1, 100), 1: Failure(-15, 101)})  # a crash: resuming may go on
    assert message.endswith(". The last checkpoint resumes with --resume RUN_DIR")
    code, message = describe_failure({0: Failure(3, 100), 1: Failure(3, 101)})  # a non-finite loss: every rank stops at one check
    assert (code, message) == (3, "ranks 0, 1 exited with code 3.")
    code, message = describe_failure({1: Failure(4, 101)})
    assert message.startswith("rank 1 (pid 101) exited with code 4; the other ranks were stopped.")


def test_a_diverging_run_on_two_ranks_says_so_once(tmp_path: Path) -> None:
    """--devices 2 and an absurd learning rate: every rank stops at the same check; people read rank
    0's line once, then the launcher's summary; exit code 3, no traceback, no advice to resume,
    and nothing of the launch left in the temporary folder (torchrun's logs folder is the launcher's to
    remove)."""
    args = ["train", "--devices", "2", "--epochs", "2", "--no-progress", "--optim.name", "sgd", "--optim.lr", "1e30", "--out", "run"]
    if torch.cuda.device_count() < 2:  # two ranks need two GPUs; on a one-GPU machine they share the CPU
        args += ["--device", "cpu"]
    (tmp_path / "tmp").mkdir()
    launcher = deepfit_process(args, cwd=tmp_path, env={"TMPDIR": str(tmp_path / "tmp"), "OMP_NUM_THREADS": None})
    try:
        _, err = launcher.communicate(timeout=120)
    finally:
        end_tree(launcher)
    assert launcher.returncode == 3, err[-2000:]
    said = [line for line in err.splitlines() if line.startswith("deepfit: ")]
    assert len(said) == 2, err[-2000:]
    assert re.fullmatch(
        r"deepfit: stopped: (the loss became (nan|inf)|a gradient became non-finite) at batch \d+ on rank [01]; .*", said[0]
    )
    # both ranks stop at one check; on a loaded machine torchrun's agent may end the slower one
    # while it is still shutting down, after the first exited (seen once in a bare suite run)
    assert re.fullmatch(
        r"deepfit: (ranks 0, 1 exited with code 3|rank ([01]) \(pid \d+\) exited with code 3; rank (?!\2)[01] was stopped)\.", said[1]
    ), said[1]
    assert "Traceback" not in err and "OMP_NUM_THREADS" not in err  # the launcher sets the ranks' threads: no torchrun banner
    assert [p.name for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchinductor_")] == []  # torch's shared cache stays


def test_bad_input_the_ranks_meet_alike_is_said_once(tmp_path: Path) -> None:
    """Each rank printed the same error line, then torchrun's own 'failed (exitcode: 2)' log line,
    and the launcher advised --resume of a run that never started."""
    args = ["train", "--devices", "2", "--device", "cpu", "--data", "nosuchdata", "--epochs", "1", "--out", "run"]
    result = run_deepfit(args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr[-2000:]
    assert lines[0].startswith("deepfit: error: unknown dataset 'nosuchdata': not a registered name")
    assert re.fullmatch(r"deepfit: (ranks 0, 1|rank [01] \(pid \d+\)) exited with code 2.* The error above names what to fix", lines[1])
    assert not (tmp_path / "run").exists()


def test_ranks_share_the_cores_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert [rank_threads(n) for n in (1, 2, 3, 8, 16, 32)] == [16, 8, 5, 2, 1, 1]


@pytest.mark.parametrize("devices", ["0", "-1"])
def test_devices_below_one_are_refused(tmp_path: Path, devices: str) -> None:
    result = run_deepfit(["train", "--data", "digits", "--devices", devices, "--out", "r"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr == f"deepfit: error: --devices must be at least 1, got {devices}\n"
    assert not (tmp_path / "r").exists()


def test_devices_checks_bad_input_before_starting_ranks(tmp_path: Path) -> None:
    result = run_deepfit(["train", "--devices", "2", "--out", "r", "--optim.lr", "-1"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "optim.lr must be positive" in result.stderr
    assert "torch.distributed" not in result.stderr  # no launcher, no rank was started
    assert not (tmp_path / "r").exists()


def test_more_ranks_than_the_machine_holds_are_one_line_before_any_starts(tmp_path: Path) -> None:
    """--devices 99 on a 2-core machine started 99 ranks, each with its own torch, until memory
    ran out; --device cuda without a GPU printed the same error once a rank, then advised --resume."""
    cores = available_cores()
    result = run_deepfit(["train", "--devices", str(cores + 1), "--device", "cpu", "--out", "r"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert (
        result.stderr
        == f"deepfit: error: --devices {cores + 1} on the CPU: this machine has {cores} core(s), one a rank: at most --devices {cores}\n"
    )
    gpus = torch.cuda.device_count()
    result = run_deepfit(["train", "--devices", str(gpus + 1), "--device", "cuda", "--out", "r"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    if gpus:
        assert (
            result.stderr
            == f"deepfit: error: --devices {gpus + 1}: this machine has {gpus} CUDA GPU(s), one a rank: at most --devices {gpus}\n"
        )
    else:
        assert result.stderr == "deepfit: error: --device cuda was asked for, but no CUDA GPU is available\n"
    assert not (tmp_path / "r").exists()


def test_resume_auto_starts_or_resumes(tmp_path: Path) -> None:
    assert resolve_resume("auto", str(tmp_path / "new")) is None
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    assert resolve_resume("auto", str(tmp_path / "old")) is None  # a folder without a checkpoint starts
    (tmp_path / "old" / "checkpoints" / "last.pt").write_bytes(b"x")
    assert resolve_resume("auto", str(tmp_path / "old")) == str(tmp_path / "old")
    assert resolve_resume("runs/x", None) == "runs/x"
    assert without_devices(["train", "--devices", "2", "--epochs", "1", "--devices=3"]) == ["train", "--epochs", "1"]
