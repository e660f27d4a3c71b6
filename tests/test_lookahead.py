"""train.lookahead N (airbench94's lookahead): every N optimizer steps the slow copy moves toward
the trained weights by 1 - 0.95**N * (step / total)**3 and the trained weights are set to it; at
the last step they become the slow copy; a run resumed from any checkpoint ends where the
uninterrupted one does, and only because the slow copy is saved."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from deepfit.checkpoint import load_checkpoint, save_checkpoint
from deepfit.config import Config, ConfigError, set_value, validate
from deepfit.fit import fit
from deepfit.lookahead import Lookahead


def test_the_slow_copy_pulls_every_n_steps_and_takes_over_at_the_end() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    start = [t.detach().clone() for t in (*model.parameters(), model[1].running_mean, model[1].running_var)]
    lookahead = Lookahead(model, every=2, total_steps=4)

    def train_step() -> None:  # any change of the weights and statistics, as an optimizer step and a forward pass make
        with torch.no_grad():
            for t in (*model.parameters(), model[1].running_mean, model[1].running_var):
                t.add_(1.0)

    train_step()
    lookahead.update(model, 1)  # not a multiple of 2: nothing happens
    assert torch.equal(model[0].weight, start[0] + 1) and torch.equal(lookahead.slow[0], start[0])
    train_step()
    lookahead.update(model, 2)
    decay = 0.95**2 * (2 / 4) ** 3
    expected = start[0] + (1 - decay) * 2.0  # slow = decay * slow + (1 - decay) * fast, fast = start + 2
    torch.testing.assert_close(lookahead.slow[0], expected)
    torch.testing.assert_close(model[0].weight.detach(), expected)  # the trained weights are the slow copy now
    torch.testing.assert_close(model[1].running_var, start[-1] + (1 - decay) * 2.0)  # buffers too
    assert model[1].num_batches_tracked.dtype == torch.int64  # integer buffers are left alone
    train_step()
    lookahead.update(model, 3)
    train_step()
    lookahead.update(model, 4)  # the last step: the trained weights become the slow copy, which does not move
    torch.testing.assert_close(model[0].weight.detach(), expected)


def config_for(tiny_idx: Path, out: Path, **values: str) -> Config:
    config = Config()
    settings = {
        "data.name": "mnist", "data.dir": str(tiny_idx), "data.batch-size": "16", "model.name": "cnn_bn", "optim.name": "sgd",
        "optim.lr": "0.05", "train.epochs": "2", "train.progress": "false", "train.lookahead": "3", "train.out": str(out),
        "train.deterministic": "true", **values,
    }  # fmt: skip
    for key, value in settings.items():
        set_value(config, key, value)
    return config


def weights(run: Path) -> list[torch.Tensor]:
    return list(load_checkpoint(run / "checkpoints" / "last.pt")["model"].values())


def test_a_resumed_run_ends_where_the_straight_one_does_because_the_slow_copy_is_saved(tiny_idx: Path, tmp_path: Path) -> None:
    straight = fit(config_for(tiny_idx, tmp_path / "straight", **{"train.checkpoint-every": "4", "train.keep-last": "10"})).run_dir
    step = sorted((straight / "checkpoints").glob("step-*.pt"))[-2]  # mid-run, between two pulls (4 is not a multiple of 3)
    off = fit(config_for(tiny_idx, tmp_path / "off", **{"train.lookahead": "0"})).run_dir
    assert not all(torch.equal(a, b) for a, b in zip(weights(straight), weights(off), strict=True))  # lookahead changed the run

    outcomes = {}
    for name, keep in (("saved", True), ("left out", False)):
        folder = tmp_path / name
        (folder / "checkpoints").mkdir(parents=True)
        state = load_checkpoint(step)
        assert state["lookahead"]["every"] == 3 and len(state["lookahead"]["slow"]) > 0
        if not keep:
            state["lookahead"] = None  # resumed as if it had never been saved: the slow copy restarts from the weights
        save_checkpoint(state, folder / "checkpoints" / "last.pt")
        fit(config_for(tiny_idx, folder), resume=folder)
        outcomes[name] = all(torch.equal(a, b) for a, b in zip(weights(straight), weights(folder), strict=True))
    assert outcomes == {"saved": True, "left out": False}
    shutil.rmtree(tmp_path / "off")


def test_a_negative_lookahead_is_refused() -> None:
    config = Config()
    set_value(config, "train.lookahead", "-1")
    with pytest.raises(ConfigError, match=r"train\.lookahead must be 0"):
        validate(config)


def test_the_pull_counts_optimizer_steps_not_batches() -> None:
    """With train.accumulate 2 the optimizer steps after batches 2, 4, 6, 8: lookahead 2 pulls after
    the 2nd and 4th of them (batches 4 and 8), not after every batch count divisible by 2."""
    model = nn.Linear(1, 1, bias=False)
    lookahead = Lookahead(model, every=2, total_steps=100)
    pulled = []
    for batches in (2, 4, 6, 8):
        with torch.no_grad():
            model.weight.add_(1.0)
        lookahead.update(model, batches)
        pulled.append(torch.equal(model.weight, lookahead.slow[0]))
    assert pulled == [False, True, False, True] and lookahead.state_dict()["updates"] == 4
