"""A NaN/inf loss or gradient stops training at the step where it appears, with a clear message and
exit code 3; the optimizer never takes that step and no checkpoint is written after it."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from deepfit.checkpoint import load_checkpoint
from deepfit.config import Config, set_value
from deepfit.engine import FiniteGuard, StepOptions, train_one_epoch
from deepfit.errors import NonFiniteError
from deepfit.fit import fit


def tiny_config(tiny_idx: Path, out: Path, **overrides: str) -> Config:
    config = Config()
    values = {
        "data.name": "mnist", "data.dir": str(tiny_idx), "data.batch-size": "16", "model.name": "lenet",
        "train.epochs": "2", "train.progress": "false", "train.out": str(out), "sched.name": "none",
        "train.checkpoint-every": "1", "train.keep-last": "100",
    } | overrides  # fmt: skip
    for key, value in values.items():
        set_value(config, key, value)
    return config


class FaultAt(nn.Module):
    """A small classifier that goes wrong on its `bad`-th training forward pass:
    'loss' makes the logits NaN; 'grad' keeps them finite but makes the gradient NaN
    (d sqrt(u)/du at u = 0 is inf, times 0 upstream gives NaN)."""

    def __init__(self, bad: int, kind: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(144, 10))
        self.bad, self.kind, self.calls = bad, kind, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls == self.bad and self.kind == "loss":
                return logits * torch.tensor(float("nan"))
            if self.calls == self.bad and self.kind == "grad":
                w = self.net[1].weight
                return logits + 0.0 * torch.sqrt(w - w.detach()).sum()
        return logits


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


@pytest.mark.parametrize("kind", ["loss", "grad"])
@pytest.mark.parametrize("bad", [1, 5, 9])  # first step, mid-epoch 1, epoch 2 (7 batches per epoch)
def test_a_fault_stops_at_its_step_and_nothing_is_saved_after_it(tiny_idx: Path, tmp_path: Path, kind: str, bad: int) -> None:
    model = FaultAt(bad, kind)
    with pytest.raises(NonFiniteError, match="loss became nan" if kind == "loss" else "gradient became non-finite"):
        fit(tiny_config(tiny_idx, tmp_path / "run"), model=model)
    assert model.calls == bad  # stopped within the bad step, not one later
    folder = tmp_path / "run" / "checkpoints"
    steps = sorted(int(p.stem.split("-")[1]) for p in folder.glob("step-*.pt"))
    assert steps == [s for s in range(1, bad) if s % 7 != 0]  # every step before the bad one; epoch ends write last.pt only
    if bad == 1:
        assert not (folder / "last.pt").exists()
        return
    last = load_checkpoint(folder / "last.pt")
    assert last["step"] == bad - 1
    assert all_finite(last["model"])
    # the optimizer did not take the bad step: the live weights are still those of step bad-1
    live = {k: v.detach() for k, v in model.state_dict().items()}
    assert all(torch.equal(live[k].cpu(), last["model"][k]) for k in live)


def test_a_diverging_run_exits_3_with_a_clear_message(cli, tiny_idx: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """No test hooks: an absurd learning rate blows up the weights, the CLI stops the run."""
    result = cli(
        "train", "--data", "mnist", "--data-dir", str(tiny_idx), "--model", "lenet", "--epochs", "2", "--no-progress",
        "--data.batch-size", "16", "--optim.name", "sgd", "--optim.lr", "1e30", "--sched.name", "none",
        "--out", "r", "--checkpoint-every", "1", "--keep-last", "100",
    )  # fmt: skip
    assert result.code == 3, result.err
    assert re.search(r"deepfit: stopped: (the loss became (nan|inf)|a gradient became non-finite)", result.err), result.err
    assert "Traceback" not in result.err
    bad = int(re.search(r"at batch (\d+)", result.err).group(1)) if "at batch" in result.err else None  # type: ignore[union-attr]
    folder = tmp_path / "r" / "checkpoints"
    saved = [load_checkpoint(p) for p in folder.glob("*.pt")]
    assert all(all_finite(s["model"]) and s["step"] < (bad or 10**9) for s in saved)
    if bad is not None and bad > 1:
        assert load_checkpoint(folder / "last.pt")["step"] == bad - 1


class FaultAfterSnapshot(FaultAt):
    """FaultAt that also keeps a copy of the weights and the optimizer state as they were when the
    bad step began: what the run must end with."""

    def __init__(self, bad: int, kind: str) -> None:
        super().__init__(bad, kind)
        self.optimizer: torch.optim.Optimizer | None = None
        self.before: dict[str, torch.Tensor] = {}
        self.optimizer_before: dict[int, dict[str, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.calls + 1 == self.bad:
            self.before = {k: v.detach().clone() for k, v in self.state_dict().items()}
            assert self.optimizer is not None
            self.optimizer_before = clone_state(self.optimizer)
        return super().forward(x)


def clone_state(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    state = optimizer.state_dict()["state"]
    return {i: {k: torch.as_tensor(v).clone() for k, v in s.items()} for i, s in state.items()}


OPTIMIZERS = {  # fused kernels skip the step on the device; rmsprop has none, so the loop reads the flag per step
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-2, fused=True),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, fused=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_without_a_per_step_sync_a_nan_never_reaches_the_weights(
    tiny_idx: Path, tmp_path: Path, kind: str, optimizer: str, device: torch.device
) -> None:
    """No step checkpoints: the guard's flag is read at the epoch's end (7 batches), so training runs
    on past the bad batch 3, skipping every update on the device; the run then stops with the
    weights and optimizer state (Adam's moments and step count too) of batch 2, bit for bit."""
    model = FaultAfterSnapshot(3, kind).to(device)
    config = tiny_config(tiny_idx, tmp_path / "run", **{"train.checkpoint-every": "0"})
    model.optimizer = OPTIMIZERS[optimizer](model.parameters())
    with pytest.raises(NonFiniteError, match=r"at batch 3;") as raised:
        fit(config, model=model, optimizer=model.optimizer)
    assert ("loss became nan" if kind == "loss" else "gradient became non-finite") in str(raised.value)
    fused = optimizer != "rmsprop"
    assert model.calls == (7 if fused else 3)  # fused: ran on to the epoch's end, no sync per step
    assert model.before and all(torch.equal(model.before[k], v) for k, v in model.state_dict().items())
    after = clone_state(model.optimizer)
    assert after.keys() == model.optimizer_before.keys()
    assert all(torch.equal(model.optimizer_before[i][k].cpu(), v.cpu()) for i, s in after.items() for k, v in s.items())
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()  # epoch 1 never ended: nothing saved


# --- the guard itself, on train_one_epoch ---------------------------------------------------


def batches_of(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(count)]


def loss_inf_at(bad: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy, plus an infinite constant on the `bad`-th batch: the loss is inf, its gradient finite."""
    calls = [0]

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return nn.functional.cross_entropy(logits, y) + (math.inf if calls[0] == bad else 0.0)

    return loss


def trained(
    batches: list[tuple[torch.Tensor, torch.Tensor]], loss: Any, *, nan_gradient_at: int = 0, **options: Any
) -> tuple[nn.Module, Exception | None]:
    """A linear model trained on `batches` with fused SGD; nan_gradient_at: that batch's weight
    gradient becomes NaN while its loss stays finite."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    seen = [0]
    model.weight.register_hook(lambda grad: grad * math.nan if seen[0] == nan_gradient_at else grad)

    def counted(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen[0] += 1
        return loss(logits, y)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    try:
        train_one_epoch(model, batches, optimizer, counted, options=StepOptions(**options))
    except NonFiniteError as err:
        return model, err
    return model, None


def test_an_infinite_loss_with_finite_gradients_still_stops_before_the_weights() -> None:
    """The gradient check alone would let this step through: the loss's own check stops it."""
    batches = batches_of(6)
    model, err = trained(batches, loss_inf_at(3))
    assert err is not None and "the loss became inf at batch 3;" in str(err)
    before_bad, _ = trained(batches[:2], nn.functional.cross_entropy)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before_bad.parameters(), strict=True))


@pytest.mark.parametrize(("accumulate", "bad", "reported"), [(1, 5, 5), (2, 5, 6), (3, 1, 3)])
def test_a_gradient_fault_is_reported_at_the_step_that_checks_it(accumulate: int, bad: int, reported: int) -> None:
    """With accumulation the gradients are checked at the optimizer step that would use them."""
    model, err = trained(batches_of(9), nn.functional.cross_entropy, nan_gradient_at=bad, accumulate=accumulate)
    assert err is not None and f"a gradient became non-finite at batch {reported};" in str(err)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checks_come_at_least_every_window_however_rare_asked() -> None:
    """check_every beyond the guard's memory of batches is read as its WINDOW, so the batch is still named."""
    _, err = trained(batches_of(FiniteGuard.WINDOW + 10), loss_inf_at(3), check_every=10**6)
    assert err is not None and "at batch 3;" in str(err)


class TwoKinds(nn.Module):
    """An fp32 and a bf16 parameter, or a sparse embedding: gradients one fused check cannot take together."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.dense = nn.Parameter(torch.zeros(3))
        self.bf16 = nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
        self.embedding = nn.Embedding(5, 2, sparse=True)

    def gradients(self, bad: bool) -> None:
        self.zero_grad(set_to_none=True)
        self.embedding(torch.tensor([1, 3])).sum().backward()
        self.dense.grad, self.bf16.grad = torch.ones(3), torch.ones(2, dtype=torch.bfloat16)
        if bad and self.case == "bf16":
            self.bf16.grad[1] = math.nan
        if bad and self.case == "sparse":
            self.embedding.weight.grad._values()[0, 1] = math.inf  # type: ignore[union-attr]


@pytest.mark.parametrize("fused", [True, False], ids=["fused check", "plain ops (mps)"])
@pytest.mark.parametrize("case", ["bf16", "sparse"])
def test_the_gradient_check_sees_gradients_of_every_dtype_and_layout(case: str, fused: bool) -> None:
    model, guard = TwoKinds(case), FiniteGuard(torch.device("cpu"))
    guard.fused = fused
    for batch in (1, 2):
        model.gradients(bad=False)
        guard.record_gradients(batch, model)
    guard.check()
    model.gradients(bad=True)
    guard.record_gradients(3, model)
    with pytest.raises(NonFiniteError, match="a gradient became non-finite at batch 3;"):
        guard.check()


def test_the_gradient_check_follows_the_model_it_is_given() -> None:
    guard = FiniteGuard(torch.device("cpu"))
    first, second = TwoKinds("bf16"), TwoKinds("bf16")
    first.gradients(bad=False)
    guard.record_gradients(1, first)
    second.gradients(bad=True)  # another model: its parameters, not the first one's, are checked
    guard.record_gradients(2, second)
    with pytest.raises(NonFiniteError, match="at batch 2;"):
        guard.check()
