"""train.cuda_graphs: the model's forward and backward replayed as CUDA graphs (issue 11's cnn_bn
speed). On the CPU the capture is torch's contract played by `stand_in`: warm-up passes that move
BatchNorm statistics and draw dropout masks, then a patched forward that accepts only the captured
shape. That checks what deepfit adds around the capture: the warm-up undone, the last partial batch
eager, a new capture when the trainable parameters change, a failed capture falling back to eager,
the model's own forward kept. On CUDA (`make test-gpu`) the real torch.cuda.make_graphed_callables
runs the same training and the NaN guard."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from deepfit.config import Config, ConfigError, set_value, validate
from deepfit.cudagraphs import GraphedForward, GraphedStep
from deepfit.engine import FiniteGuard, StepOptions, train_one_epoch
from deepfit.errors import NonFiniteError
from deepfit.fit import fit
from deepfit.fitparts import cuda_graphs

SIDE = 8


def small_net() -> nn.Module:
    """Conv-BN-ReLU-pool, dropout, linear: running statistics and random masks, as cnn_bn has."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(8 * (SIDE // 2) ** 2, 3),
    )  # fmt: skip


def batches(device: torch.device, sizes: tuple[int, ...] = (16, 16, 16, 6), seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, SIDE, SIDE, generator=g).to(device), torch.randint(0, 3, (n,), generator=g).to(device)) for n in sizes]


def stand_in(replays: list[int], autocast_seen: list[bool] | None = None) -> Callable[..., nn.Module]:
    """torch.cuda.make_graphed_callables as the CPU can play it: its warm-up (train-mode passes,
    gradients taken but never stored), then model.forward patched to replay one shape only.
    `autocast_seen`: whether autocast was on around the capture, where torch records the backward."""

    def capture(module: nn.Module, sample_args: tuple[torch.Tensor, ...], num_warmup_iters: int) -> nn.Module:
        (sample,) = sample_args
        params = [p for p in module.parameters() if p.requires_grad]
        if autocast_seen is not None:
            autocast_seen.append(torch.is_autocast_enabled(sample.device.type))
        if torch.is_autocast_enabled(sample.device.type) and torch.is_autocast_cache_enabled():  # torch's own refusal
            raise RuntimeError("make_graphed_callables does not support the autocast caching")
        for _ in range(num_warmup_iters):
            out = module(sample)
            torch.autograd.grad(out, params, grad_outputs=torch.randn_like(out))
        own = module.forward

        def replay(x: torch.Tensor) -> torch.Tensor:
            if x.shape != sample.shape:
                raise RuntimeError(f"a graph captured for {tuple(sample.shape)} was given {tuple(x.shape)}")
            replays.append(len(x))
            return own(x)

        module.forward = replay  # type: ignore[method-assign]
        return module

    return capture


def train(
    model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], epochs: int, graphs: GraphedForward | None = None, **step: Any
) -> None:
    torch.manual_seed(1)  # the dropout masks
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = FiniteGuard(next(model.parameters()).device)
    for _ in range(epochs):
        train_one_epoch(model, data, optimizer, nn.functional.cross_entropy, options=StepOptions(guard=guard, graphs=graphs, **step))


def same_state(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_the_graphs_hold_the_accumulate_grad_nodes_training_uses() -> None:
    """GraphedForward makes each trainable parameter's AccumulateGrad node before capturing, on the
    stream training runs on, and holds it: the nodes every later step accumulates through."""
    torch.manual_seed(0)
    model = small_net()
    graphs = GraphedForward(model, capture=stand_in([]))
    data = batches(torch.device("cpu"))
    train(model, data[:1], epochs=1, graphs=graphs)  # the capture, on the first batch
    assert len(graphs.accumulators) == len(list(model.parameters()))
    fired: list[int] = []

    def firing(node: Any) -> None:
        node.register_prehook(lambda grads: fired.append(id(node)))

    for node in graphs.accumulators:
        firing(node)
    train(model, data, epochs=1, graphs=graphs)
    assert set(fired) == {id(node) for node in graphs.accumulators} and len(fired) == len(graphs.accumulators) * len(data)


def test_graphed_training_ends_where_eager_training_does() -> None:
    torch.manual_seed(0)
    eager, data = small_net(), batches(torch.device("cpu"))
    graphed = copy.deepcopy(eager)
    replays: list[int] = []
    graphs = GraphedForward(graphed, capture=stand_in(replays))
    train(eager, data, epochs=2)
    train(graphed, data, epochs=2, graphs=graphs)
    assert same_state(eager, graphed)  # the warm-up's BatchNorm updates and dropout draws were undone
    assert graphs.captures == 1
    assert replays == [16, 16, 16] * 2  # the partial batch of 6 ran eagerly, each epoch
    assert "forward" not in graphed.__dict__  # evaluation and export see the model's own forward
    graphed.eval()
    assert graphed(data[0][0]).shape == (16, 3)


def test_under_autocast_only_the_forward_is_captured_in_it() -> None:
    torch.manual_seed(0)
    eager, data = small_net(), batches(torch.device("cpu"))
    graphed = copy.deepcopy(eager)
    replays: list[int] = []
    autocast_seen: list[bool] = []
    graphs = GraphedForward(graphed, autocast_dtype=torch.bfloat16, capture=stand_in(replays, autocast_seen))
    train(eager, data, epochs=2, autocast_dtype=torch.bfloat16)
    train(graphed, data, epochs=2, graphs=graphs, autocast_dtype=torch.bfloat16)
    assert autocast_seen == [False]  # the backward is recorded outside autocast, as eager training runs it
    assert replays == [16, 16, 16] * 2
    assert same_state(eager, graphed)  # the forward ran in bf16 as the eager one did


def test_a_change_of_trainable_parameters_captures_again() -> None:
    model, data = small_net(), batches(torch.device("cpu"), (16, 16))
    replays: list[int] = []
    graphs = GraphedForward(model, capture=stand_in(replays))
    train(model, data, epochs=1, graphs=graphs)
    model[0].bias.requires_grad_(False)  # as airbench_whiten's stem bias stops learning
    train(model, data, epochs=1, graphs=graphs)
    train(model, data, epochs=1, graphs=graphs)
    assert graphs.captures == 2
    assert replays == [16] * 6


def test_a_first_partial_batch_is_outgrown_by_a_full_one() -> None:
    model = small_net()
    replays: list[int] = []
    graphs = GraphedForward(model, capture=stand_in(replays))
    train(model, batches(torch.device("cpu"), (6,)), epochs=1, graphs=graphs)  # a resume at the last, partial batch
    train(model, batches(torch.device("cpu"), (16, 16, 6)), epochs=1, graphs=graphs)
    assert graphs.captures == 2
    assert replays == [6, 16, 16]


def test_a_failed_capture_warns_once_and_trains_eagerly() -> None:
    torch.manual_seed(0)
    eager, data = small_net(), batches(torch.device("cpu"))
    failing = copy.deepcopy(eager)

    def refuse(module: nn.Module, sample_args: tuple[torch.Tensor, ...], num_warmup_iters: int) -> nn.Module:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore lines")

    graphs = GraphedForward(failing, capture=refuse)
    with pytest.warns(
        UserWarning,
        match=r"train\.cuda_graphs: Sequential could not be captured \(CUDA error: operation not permitted when stream is capturing\); training eagerly$",
    ):
        train(failing, data, epochs=2, graphs=graphs)
    train(eager, data, epochs=2)
    assert graphs.failed and graphs.captures == 0
    assert same_state(eager, failing)


def test_graphs_refuse_gradient_accumulation() -> None:
    model = small_net()
    with pytest.raises(ValueError, match="accumulate"):
        train(model, batches(torch.device("cpu")), epochs=1, graphs=GraphedForward(model, capture=stand_in([])), accumulate=2)
    with pytest.raises(ValueError, match="must wrap the model"):
        train(model, batches(torch.device("cpu")), epochs=1, graphs=GraphedForward(small_net(), capture=stand_in([])))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"train.accumulate": "2"}, r"train\.cuda_graphs .*train\.accumulate"),
        ({"model.compile": "true"}, r"train\.cuda_graphs .* model\.compile"),
    ],
)
def test_config_refuses_what_graphs_cannot_do(setting: dict[str, str], message: str) -> None:
    config = Config()
    for key, value in {"train.cuda_graphs": "true", **setting}.items():
        set_value(config, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_graphs_are_for_cuda_and_one_process() -> None:
    config = Config()
    config.train.cuda_graphs, config.train.precision = True, "bf16"
    model = small_net()
    unfused = torch.optim.RMSprop(model.parameters())  # no fused kernel: the model alone is graphed
    setup = functools.partial(cuda_graphs, config, model, optimizer=unfused, scheduler=None)
    assert setup(torch.device("cpu"), ranks=1) is None  # other devices: no effect
    graphs = setup(torch.device("cuda"), ranks=1)  # nothing touches CUDA until the first batch
    assert isinstance(graphs, GraphedForward) and graphs.model is model and graphs.autocast_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="torchrun"):
        setup(torch.device("cuda"), ranks=2)
    config.train.cuda_graphs = False
    assert setup(torch.device("cuda"), ranks=1) is None


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (make test-gpu runs these)")


@needs_cuda
@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_cuda_graphs_replay_and_train_as_eager_does(device: torch.device, precision: torch.dtype | None) -> None:
    if device.type != "cuda":
        pytest.skip("DEEPFIT_TEST_DEVICE is not cuda")
    torch.manual_seed(0)
    eager = small_net().to(device)
    graphed, data = copy.deepcopy(eager), batches(device)
    graphs = GraphedForward(graphed, autocast_dtype=precision)
    calls: list[int] = []
    graphed[0].register_forward_hook(lambda module, args, out: calls.append(len(args[0])))  # Python runs only outside replays
    train(eager, data, epochs=2, autocast_dtype=precision)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(graphed, data, epochs=2, graphs=graphs, autocast_dtype=precision)
    assert not [w for w in caught if "AccumulateGrad node's stream" in str(w.message)]  # no stream sync per gradient
    assert graphs.captures == 1 and not graphs.failed
    assert calls == [16] * (GraphedForward.WARMUP + 1) + [6, 6]  # warm-up, capture, then only the partial batches ran eagerly
    for a, b in zip(eager.state_dict().values(), graphed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the same kernels, replayed


@needs_cuda
def test_cuda_graphs_keep_a_nan_from_the_weights(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("DEEPFIT_TEST_DEVICE is not cuda")
    torch.manual_seed(0)
    model = small_net().to(device)
    data = batches(device, (16, 16, 16, 16))
    graphed = copy.deepcopy(model)
    train(model, data[:2], epochs=1)  # two good steps
    data[2][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="batch 3"):
        train(graphed, data, epochs=1, graphs=GraphedForward(graphed))
    for a, b in zip(model.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # batch 3 and 4 never stepped


@needs_cuda
@pytest.mark.parametrize(("optimizer", "graphed"), [("adam", GraphedStep), ("rmsprop", GraphedForward)])
def test_fit_trains_with_cuda_graphs(
    device: torch.device, tiny_idx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimizer: str, graphed: type
) -> None:
    if device.type != "cuda":
        pytest.skip("DEEPFIT_TEST_DEVICE is not cuda")
    made: list[bool] = []
    real_make = graphed.make

    def recording_make(self: Any, *args: Any) -> Any:
        out = real_make(self, *args)
        made.append(not self.failed)
        return out

    monkeypatch.setattr(graphed, "make", recording_make)
    config = Config()
    values = {
        "data.name": "mnist", "data.dir": str(tiny_idx), "data.batch-size": "16", "model.name": "cnn_bn", "optim.name": optimizer,
        "train.epochs": "3", "train.progress": "false", "train.out": str(tmp_path / "run"), "train.cuda-graphs": "true",
    }  # fmt: skip
    for key, value in values.items():
        set_value(config, key, value)
    result = fit(config)
    assert made == [True]  # captured once and used for the 3 epochs (the whole step: after its warm-up batches)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert (tmp_path / "run" / "checkpoints" / "best.pt").exists()
