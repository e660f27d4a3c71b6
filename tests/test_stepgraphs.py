"""train.cuda_graphs recording the whole step (cudagraphs.GraphedStep): forward, loss, the guard's
checks, backward, the fused optimizer's update and the epoch's sums as one CUDA graph. On the CPU
the recording is played by `StandIn`: it keeps the body and runs it at each replay, and checks
what a CUDA capture needs at the moment it records: the optimizer's state already made (the
warm-up ran eagerly first), no gradients yet (the graph makes its own), the learning rates as
tensors inside the body and plain floats outside. That checks what deepfit does around the
recording: the same training as eager steps, the schedule reaching the recorded step, the NaN
guard, the partial batch eager, a new recording when what it assumed changes, a failed recording
falling back to eager. On CUDA (`make test-gpu`) torch.cuda.graph records the same training."""

from __future__ import annotations

import copy
import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from deepfit.config import Config, load_config
from deepfit.cudagraphs import GraphedForward, GraphedStep, steps_can_be_graphed
from deepfit.engine import FiniteGuard, StepOptions, Totals, train_one_epoch
from deepfit.errors import NonFiniteError
from deepfit.fit import fit
from deepfit.fitparts import cuda_graphs
from tests.test_configs import tiny_colour_bundle
from tests.test_cudagraphs import batches, small_net
from tests.test_cudagraphs import stand_in as model_stand_in
from tests.test_gpu_recipe import RECIPE

Body = Callable[[], None]


class StandIn:
    """torch.cuda.graph as the CPU can play it: `record` keeps the body (a capture records launches
    without running them) and checks the optimizer as a capture needs it; each replay runs the body
    on fresh gradients (the recorded backward wrote into buffers it made, not adding to them)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, refuse: str | None = None) -> None:
        self.optimizer, self.refuse = optimizer, refuse
        self.recorded = 0
        self.replays = 0
        self.rates_seen: list[bool] = []  # inside the body: every group's lr is a tensor

    def record(self, body: Body) -> Body:
        if self.refuse is not None:
            raise RuntimeError(self.refuse)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        assert all(p.grad is None for p in params), "a capture must make its own gradient buffers"
        assert all(self.optimizer.state[p] for p in params), "the optimizer's lazy state must exist before a capture"
        assert all(isinstance(group["lr"], float) for group in self.optimizer.param_groups)
        self.recorded += 1

        def replay() -> None:
            self.replays += 1
            original = self.optimizer.step

            def step(*args: Any, **kwargs: Any) -> Any:
                self.rates_seen.append(all(isinstance(g["lr"], torch.Tensor) for g in self.optimizer.param_groups))
                return original(*args, **kwargs)

            self.optimizer.step = step  # type: ignore[method-assign]
            self.optimizer.zero_grad(set_to_none=True)  # the recorded backward found no gradients: a replay writes them anew
            try:
                body()
            finally:
                del self.optimizer.step

        return replay


def fused_sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=2**-3, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True)


def train(
    model: nn.Module,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    epochs: int,
    recorded: bool,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] = fused_sgd,
    refuse: str | None = None,
    scaled: bool = False,
    fallback: GraphedForward | None = None,
) -> tuple[list[dict[str, float]], GraphedStep | None, StandIn | None]:
    """Train `epochs` epochs with a per-step schedule, eagerly or by recorded steps (on CUDA: torch's
    own recording); the rows and parts. scaled: under fp16 autocast with a loss scaler (on the CPU,
    which has no fp16 autocast: bf16)."""
    torch.manual_seed(1)  # the dropout masks
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, halving)  # a new lr every step
    device = next(model.parameters()).device
    recorder = StandIn(optimizer, refuse=refuse) if recorded and device.type != "cuda" else None
    record = recorder.record if recorder is not None else None
    steps = GraphedStep(model, optimizer, record=record, fallback=fallback) if recorded else None
    options = StepOptions(scheduler=scheduler, guard=FiniteGuard(device), steps=steps, totals=Totals(device))
    if scaled:
        options.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**8)
        options.autocast_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    rows = [train_one_epoch(model, data, optimizer, nn.functional.cross_entropy, options=options) for _ in range(epochs)]
    return rows, steps, recorder


def halving(step: int) -> float:
    """A learning-rate factor that changes every step and, times a power of two, is exact in
    float32 (the recorded step reads the rate from a float32 tensor, the eager one a double)."""
    return 0.5 ** (step % 4)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        fused_sgd,
        lambda m: torch.optim.Adam(m.parameters(), lr=2**-6, fused=True),
        lambda m: torch.optim.AdamW(m.parameters(), lr=2**-6, fused=True),
    ],
    ids=["sgd", "adam", "adamw"],
)
@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "scaled"])
def test_recorded_steps_train_as_eager_steps_do(make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], scaled: bool) -> None:
    torch.manual_seed(0)
    eager = small_net()
    recorded, data = copy.deepcopy(eager), batches(torch.device("cpu"), (16, 16, 16, 16, 16, 6))
    eager_rows, _, _ = train(eager, data, epochs=2, recorded=False, make_optimizer=make_optimizer, scaled=scaled)
    rows, steps, recorder = train(recorded, data, epochs=2, recorded=True, make_optimizer=make_optimizer, scaled=scaled)
    assert steps is not None and recorder is not None
    assert steps.captures == 1 and recorder.recorded == 1 and not steps.failed
    assert recorder.replays == 2 + 5  # epoch 1: 3 eager, recorded at the 4th; epoch 2: every full batch; partial ones eager
    assert recorder.rates_seen == [True] * 7  # the recorded optimizer reads the rates the schedule wrote
    for ours, theirs in zip(rows, eager_rows, strict=True):
        assert ours == pytest.approx(theirs, rel=1e-5)  # the epoch's sums, added inside the step
    assert_same_weights(recorded, eager)


def test_a_nan_in_a_recorded_step_never_reaches_the_weights() -> None:
    torch.manual_seed(0)
    model = small_net()
    recorded = copy.deepcopy(model)
    data = batches(torch.device("cpu"), (16,) * 6)
    train(model, data[:4], epochs=1, recorded=False)  # four good steps
    data[4][0][0, 0, 0, 0] = float("nan")  # batch 5: replayed (3 eager, the 4th recorded)
    with pytest.raises(NonFiniteError, match=r"the loss became nan at batch 5"):
        train(recorded, data, epochs=1, recorded=True)
    for a, b in zip(model.parameters(), recorded.parameters(), strict=True):
        torch.testing.assert_close(
            a, b, rtol=1e-6, atol=1e-7
        )  # batches 5 and 6 never stepped (BatchNorm's statistics saw the NaN, as eagerly)


def test_a_change_the_recording_assumed_records_again() -> None:
    torch.manual_seed(0)
    model = small_net()
    optimizer = fused_sgd(model)
    recorder = StandIn(optimizer)
    steps = GraphedStep(model, optimizer, record=recorder.record)
    options = StepOptions(guard=FiniteGuard(torch.device("cpu")), steps=steps, totals=Totals(torch.device("cpu")))
    data = batches(torch.device("cpu"), (16,) * 5)
    epoch = functools.partial(train_one_epoch, model, data, optimizer, nn.functional.cross_entropy, options=options)
    epoch()
    assert (steps.captures, recorder.replays) == (1, 2)
    model[0].bias.requires_grad_(False)  # a parameter stops learning (airbench_whiten's stem bias)
    bias = model[0].bias.detach().clone()
    epoch()
    assert (steps.captures, recorder.replays) == (2, 4)  # 3 eager batches first, then recorded anew
    assert torch.equal(model[0].bias, bias)  # no gradient of the old recording moved it
    optimizer.param_groups[0]["momentum"] = 0.5  # a setting the recording kept as a constant
    epoch()
    assert steps.captures == 3
    train_one_epoch(model, data, optimizer, nn.functional.cross_entropy, options=dataclass_copy(options))  # other totals
    assert steps.captures == 4


def test_epochs_shorter_than_the_warm_up_are_recorded_in_a_later_one() -> None:
    torch.manual_seed(0)
    model = small_net()
    data = batches(torch.device("cpu"), (16, 16, 6))  # 2 full batches and a partial one an epoch
    _, steps, recorder = train(model, data, epochs=3, recorded=True)
    assert steps is not None and recorder is not None
    assert (steps.captures, recorder.replays) == (1, 1 + 2)  # the 4th full batch (epoch 2's second) records


def dataclass_copy(options: StepOptions) -> StepOptions:
    copied = copy.copy(options)
    copied.totals = Totals(torch.device("cpu"))
    return copied


@pytest.mark.parametrize("fallback", [False, True], ids=["eager", "model-graphs"])
def test_a_failed_recording_warns_once_then_graphs_the_model_or_trains_eagerly(fallback: bool) -> None:
    torch.manual_seed(0)
    eager = small_net()
    recorded, data = copy.deepcopy(eager), batches(torch.device("cpu"), (16,) * 5)
    train(eager, data, epochs=2, recorded=False)
    replays: list[int] = []
    model_graphs = GraphedForward(recorded, capture=model_stand_in(replays)) if fallback else None
    then = "graphing the model alone" if fallback else "training eagerly"
    with pytest.warns(UserWarning, match=rf"the training step of Sequential could not be captured \(operation not permitted\); {then}$"):
        _, steps, _ = train(
            recorded, data, epochs=2, recorded=True, refuse="operation not permitted\nwhile capturing", fallback=model_graphs
        )
    assert steps is not None and steps.failed and steps.captures == 0
    if model_graphs is not None:  # captured at the batch that failed to record (the 4th), replayed from then on
        assert model_graphs.captures == 1 and replays == [16] * (2 + 5)
    assert_same_weights(recorded, eager)


def test_recorded_steps_refuse_what_they_cannot_record() -> None:
    model = small_net()
    optimizer = fused_sgd(model)
    steps = GraphedStep(model, optimizer, record=StandIn(optimizer).record)
    data = batches(torch.device("cpu"))
    loss = nn.functional.cross_entropy
    for options in (StepOptions(steps=steps, accumulate=2), StepOptions(steps=steps, graphs=GraphedForward(model))):
        with pytest.raises(ValueError, match=r"StepOptions\.steps|accumulate"):
            train_one_epoch(model, data, optimizer, loss, options=options)
    with pytest.raises(ValueError, match="model and optimizer being trained"):
        train_one_epoch(model, data, fused_sgd(model), loss, options=StepOptions(steps=steps))


def test_graphs_record_the_whole_step_where_they_can() -> None:
    config = Config()
    config.train.cuda_graphs = True
    model = small_net()
    cuda = torch.device("cuda")  # nothing touches CUDA until the first batch
    sgd, adam = fused_sgd(model), torch.optim.Adam(model.parameters(), fused=True)
    assert isinstance(cuda_graphs(config, model, cuda, ranks=1, optimizer=sgd, scheduler=None), GraphedStep)
    assert isinstance(cuda_graphs(config, model, cuda, ranks=1, optimizer=adam, scheduler=None), GraphedStep)
    unfused = torch.optim.SGD(model.parameters(), lr=0.1)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(fused_sgd(model), max_lr=0.1, total_steps=10)  # cycles the momentum
    for optimizer, scheduler in ((unfused, None), (torch.optim.RMSprop(model.parameters()), None), (one_cycle.optimizer, one_cycle)):
        graphs = cuda_graphs(config, model, cuda, ranks=1, optimizer=optimizer, scheduler=scheduler)
        assert isinstance(graphs, GraphedForward)  # the model's forward and backward only
    config.train.precision = "fp16"  # with a fused optimizer, a loss scaler reads nothing on the host
    steps = cuda_graphs(config, model, cuda, ranks=1, optimizer=sgd, scheduler=None)
    assert isinstance(steps, GraphedStep) and steps.fallback is not None and steps.fallback.autocast_dtype == torch.float16
    assert cuda_graphs(config, model, torch.device("cpu"), ranks=1, optimizer=sgd, scheduler=None) is None
    warm_up = torch.optim.lr_scheduler.SequentialLR(
        one_cycle.optimizer, [torch.optim.lr_scheduler.LinearLR(one_cycle.optimizer), one_cycle], milestones=[2]
    )
    assert not steps_can_be_graphed(one_cycle.optimizer, warm_up)  # found inside a chain too


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (make test-gpu runs these)")


@needs_cuda
@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "fp16-scaled"])
def test_cuda_records_the_step_and_trains_as_eager_does(device: torch.device, scaled: bool) -> None:
    if device.type != "cuda":
        pytest.skip("DEEPFIT_TEST_DEVICE is not cuda")
    torch.manual_seed(0)
    eager = small_net().to(device)
    recorded, data = copy.deepcopy(eager), batches(device, (16, 16, 16, 16, 16, 6))
    eager_rows, _, _ = train(eager, data, epochs=2, recorded=False, scaled=scaled)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, steps, _ = train(recorded, data, epochs=2, recorded=True, scaled=scaled)
    assert not [w for w in caught if "AccumulateGrad node's stream" in str(w.message)]  # no stream sync per gradient
    assert steps is not None and steps.captures == 1 and not steps.failed
    assert rows[-1]["loss"] == pytest.approx(eager_rows[-1]["loss"], rel=1e-3)
    for a, b in zip(eager.state_dict().values(), recorded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # the same kernels, replayed


@needs_cuda
def test_cuda_keeps_a_nan_in_a_recorded_step_from_the_weights(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("DEEPFIT_TEST_DEVICE is not cuda")
    torch.manual_seed(0)
    model = small_net().to(device)
    recorded = copy.deepcopy(model)
    data = batches(device, (16,) * 6)
    train(model, data[:4], epochs=1, recorded=False)
    data[4][0][0, 0, 0, 0] = float("nan")  # batch 5: replayed
    with pytest.raises(NonFiniteError, match=r"the loss became nan at batch 5"):
        train(recorded, data, epochs=1, recorded=True)
    for a, b in zip(model.parameters(), recorded.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fit_records_the_gpu_recipes_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fit() with the step recorded (the stand-in, on the CPU) trains the GPU recipe as eagerly:
    two parameter groups on a per-step schedule, lookahead, alternating flips; recorded anew when
    the stem's bias stops learning after epoch 3."""
    made: list[GraphedStep] = []

    def recorded(config: Config, model: nn.Module, device: torch.device, **kwargs: Any) -> GraphedStep:
        made.append(GraphedStep(model, kwargs["optimizer"], record=StandIn(kwargs["optimizer"]).record))
        return made[-1]

    histories, weights = [], []
    for name in ("eager", "recorded"):
        if name == "recorded":
            monkeypatch.setattr(sys.modules["deepfit.fit"], "cuda_graphs", recorded)  # the package exports the function fit
        config = load_config(RECIPE)
        config.train.epochs, config.train.out, config.data.batch_size = 5, str(tmp_path / name), 16
        config.train.precision, config.train.tta = "32", "none"
        result = fit(config, data=tiny_colour_bundle())
        histories.append([{k: v for k, v in row.items() if k != "seconds"} for row in result.history])
        weights.append(result.model)
    assert len(made) == 1 and made[0].captures == 2  # the stem's bias stopped learning after epoch 3
    for ours, theirs in zip(histories[1], histories[0], strict=True):
        assert ours == pytest.approx(theirs, rel=1e-4)
    for a, b in zip(weights[0].state_dict().values(), weights[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 learning rates in the recorded step
