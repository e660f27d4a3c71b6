"""train.cuda_graphs: training steps replayed as CUDA graphs.

A small model on a GPU spends its step launching kernels, not running them (cnn_bn on an H200,
batch 128: about 88 launches a step, the GPU busy a quarter of the time). A CUDA graph records
the launches once and replays them as one. Two ways, chosen by fitparts.cuda_graphs:

GraphedStep records the whole step (forward, loss, the non-finite guard's checks, backward, the
fused optimizer's update with an fp16 loss scaler's, the epoch's sums) and replays it as one
launch; the host then only copies the batch in, notes the batch numbers and steps the schedule.
It needs a fused SGD, Adam or AdamW (they take the learning rate as a tensor the host updates,
and skip a step on the device) and no schedule of the momentum.

GraphedForward, otherwise (or where the step could not be recorded), records the model's forward
and backward only, with torch's `make_graphed_callables`: the loss, the guard, the optimizer and
the schedule stay eager.
Lookahead and EMA stay eager in both, after the step.

A capture is made for the first batch and kept while the batches keep its shape and the model the
same trainable parameters; a batch of another shape (the last, partial one) runs eagerly, and a
change of trainable parameters (airbench_whiten's stem bias stopping) captures again. The capture's
warm-up passes would move BatchNorm's running statistics and draw dropout masks: both are put back,
so a graphed run trains on what an eager one does."""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from deepfit.errors import first_line

Capture = Callable[..., Any]  # torch.cuda.make_graphed_callables(module, (sample,), num_warmup_iters=...)
Forward = Callable[[torch.Tensor], torch.Tensor]
Step = Callable[[torch.Tensor, torch.Tensor], None]  # one training step's device work on a batch (engine.captured_step)
Record = Callable[[Callable[[], None]], Callable[[], None]]  # records a function's launches once; returns their replay


class GraphedForward:
    """`model`'s training-mode forward (and, through autograd, its backward) from CUDA graphs where
    a batch fits the capture, else the model's own. Call it as the model: `logits = graphed(x)`.
    Gradients reach `.grad` as usual; accumulating them over batches is not supported (each replay
    writes the same buffers). `capture` stands in for torch.cuda.make_graphed_callables in tests."""

    WARMUP = 3  # eager passes before capturing (torch's default): cuDNN's autotuner and lazy init run outside the graph

    def __init__(self, model: nn.Module, *, autocast_dtype: torch.dtype | None = None, capture: Capture | None = None) -> None:
        self.model = model
        self.params = list(model.parameters())  # walked once, not every step (12 us for cnn_bn)
        self.autocast_dtype = autocast_dtype
        self.capture = capture if capture is not None else torch.cuda.make_graphed_callables
        self.graphed: Forward | None = None
        self.layout: tuple[Any, ...] | None = None  # (shape, strides, dtype) of the captured batch
        self.trainable: tuple[bool, ...] | None = None  # requires_grad of each parameter at capture
        self.captures = 0
        self.failed = False
        self.accumulators: list[Any] = []  # the parameters' AccumulateGrad nodes, made on the training stream (see make)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        graphed = self.graphed_for(x)
        return graphed(x) if graphed is not None else self.model(x)

    def graphed_for(self, x: torch.Tensor) -> Forward | None:
        """The graphed forward for batch x, capturing first when needed; None: run x eagerly."""
        if self.failed or not self.model.training:
            return None
        trainable = tuple(p.requires_grad for p in self.params)
        stale = self.graphed is None or trainable != self.trainable
        if stale or (self.layout is not None and x.shape[0] > self.layout[0][0]):  # a first partial batch (a resume) is outgrown
            self.graphed = self.make(x)
            self.layout, self.trainable = layout(x), trainable
        return self.graphed if layout(x) == self.layout else None

    def make(self, x: torch.Tensor) -> Forward | None:
        """Capture the model for batches shaped as x; on failure warn once and train eagerly."""
        self.graphed = None  # the previous graphs and their memory go first
        self.accumulators = gradient_accumulators(self.params)  # those made at an earlier capture are held until now: reused
        sample = x.detach().clone()  # the graphs' own input buffer, laid out as x
        captured = self.model if self.autocast_dtype is None else Autocast(self.model, self.autocast_dtype)
        try:
            with kept_state(self.model, x.device), torch.autocast(device_type=x.device.type, enabled=False):  # the loop's own
                self.capture(captured, (sample,), num_warmup_iters=self.WARMUP)
        except (RuntimeError, AssertionError) as err:  # a host read or hook in the model's forward, say
            self.failed = True
            first = first_line(err)
            warnings.warn(f"train.cuda_graphs: {type(self.model).__name__} could not be captured ({first}); training eagerly", stacklevel=2)
            return None
        finally:  # the capture patches the module's forward: evaluation, export and saving keep the model's own
            graphed = captured.__dict__.pop("forward", None)
        self.captures += 1
        return graphed


class Autocast(nn.Module):
    """`model`'s forward under autocast, for capturing: the backward is then captured outside
    autocast, as eager training runs it (an outer autocast would reach the captured backward's ops
    too: pytorch/pytorch#120930), and without autocast's weight cache, which capture refuses."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=self.dtype, cache_enabled=False):
            return self.model(x)


def gradient_accumulators(params: list[nn.Parameter]) -> list[Any]:
    """Each trainable parameter's AccumulateGrad node (autograd makes one per parameter, remembers
    the stream it was made on, and reuses it while something holds it), made here on the current
    stream, the one training runs on. Held by the caller, they are the nodes the capture's warm-up
    and graphs connect to: otherwise those are made on torch's capture streams and kept alive by the
    graphs' static outputs, and every replayed backward then pays a stream synchronisation per
    parameter to accumulate its gradient (torch warns: "The AccumulateGrad node's stream does not
    match the stream of the node that produced the incoming gradient", seen on an H200)."""
    return [p.view_as(p).grad_fn.next_functions[0][0] for p in params if p.requires_grad]  # type: ignore[union-attr]


def layout(x: torch.Tensor) -> tuple[Any, ...]:
    return tuple(x.shape), x.stride(), x.dtype


@contextlib.contextmanager
def kept_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Undo what a capture's warm-up passes do besides capturing: BatchNorm's running statistics
    and counts (copied back in place: the graphs hold their addresses) and the device's random
    state (dropout masks)."""
    buffers = [b.detach().clone() for b in model.buffers()]
    rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        if device.type == "cuda":
            torch.cuda.set_rng_state(rng, device)
        else:
            torch.set_rng_state(rng)


def record_cuda(body: Callable[[], None]) -> Callable[[], None]:
    """`body`'s kernels recorded into a CUDA graph (not run); its replay. thread_local: a DataLoader's
    pin-memory thread may use CUDA while this one captures."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        body()
    return graph.replay


class GraphedStep:
    """A whole training step replayed as one CUDA graph. `run(x, y, step, parts)` trains on a batch
    by replaying `step` recorded on the graph's own input buffers (copied into first) and returns
    True, or returns False and the caller trains on the batch eagerly: before the capture (the
    first WARMUP batches of a shape train eagerly, which also lets cuDNN's autotuner and the
    optimizer's lazy state run outside it), for a batch of another shape (the last, partial one),
    and for good once a capture failed (with a warning). A change of trainable parameters
    (airbench_whiten's stem bias stopping), of a hyperparameter other than the learning rate, or
    of the objects `step` uses (`parts`) starts the count again and captures anew.

    The graph holds raw addresses: the parameters, the optimizer's state, `parts`' tensors and the
    gradients it made must stay where they are (all updates in place), and this object keeps
    `step` and `parts` alive while it replays them. The learning rates are read from tensors it
    fills from the param groups' floats when they change; between replays the param groups keep
    plain floats, as every other reader expects. `record` stands in for the CUDA capture in tests."""

    WARMUP = 3

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, record: Record | None = None, fallback: GraphedForward | None = None
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.fallback = fallback  # the model's graphs, trained with once the step could not be recorded
        self.params = list(model.parameters())
        self.record = record if record is not None else record_cuda
        self.replay: Callable[[], None] | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None  # the graph's own x and y
        self.shape: tuple[Any, ...] | None = None  # the layouts of the captured x and y
        self.key: tuple[Any, ...] | None = None  # what the capture assumed (key_of)
        self.warm: Counter[tuple[Any, ...]] = Counter()  # eager batches of each layout since the key changed
        self.held: tuple[Any, ...] = ()  # step and parts, alive while the graph points into them
        self.rates: list[torch.Tensor] = []  # each param group's learning rate, as the graph reads it
        self.written: list[float] = []  # the values last filled into `rates`
        self.holds_grads = False  # replayed last: .grad holds the graph's buffers, not an eager step's
        self.captures = 0
        self.failed = False

    def run(self, x: torch.Tensor, y: torch.Tensor, step: Step, parts: tuple[Any, ...]) -> bool:
        """Train on (x, y) by replaying `step`, capturing it first when due; False: train eagerly."""
        if self.failed or not self.model.training:
            return self.eager()
        key = self.key_of(parts)
        if key != self.key:
            self.replay, self.key, self.warm = None, key, Counter()
        shape = (layout(x), layout(y))
        if self.replay is None and self.warmed(shape):
            self.make(x, y, shape, step, parts)
        if self.replay is None or self.inputs is None or shape != self.shape:
            return self.eager()
        self.write_rates()
        self.inputs[0].copy_(x)
        self.inputs[1].copy_(y)
        self.replay()
        self.holds_grads = True
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of an eagerly trained batch: from the fallback's graphs once recording failed."""
        return self.fallback(x) if self.failed and self.fallback is not None else self.model(x)

    def eager(self) -> bool:
        """False, after clearing the gradients a replay left (an eager backward would add to them)."""
        if self.holds_grads:
            self.optimizer.zero_grad(set_to_none=True)
            self.holds_grads = False
        return False

    def key_of(self, parts: tuple[Any, ...]) -> tuple[Any, ...]:
        trainable = tuple(p.requires_grad for p in self.params)
        return trainable, baked_settings(self.optimizer), tuple(id(part) for part in parts)

    def warmed(self, shape: tuple[Any, ...]) -> bool:
        """Whether WARMUP eager batches of `shape` came before (others between them do not count:
        an epoch of 3 full batches and a partial one records at the next epoch's first); else
        count this one."""
        if self.warm[shape] >= self.WARMUP:
            return True
        self.warm[shape] += 1
        return False

    def make(self, x: torch.Tensor, y: torch.Tensor, shape: tuple[Any, ...], step: Step, parts: tuple[Any, ...]) -> None:
        """Record `step` on copies of (x, y), laid out as `shape`; on failure warn once and train
        with the fallback's model graphs (or eagerly) from now on."""
        self.replay, self.held, self.holds_grads = None, (), False  # the previous graph and its memory go first
        self.optimizer.zero_grad(set_to_none=True)  # the recorded backward makes the graph's own gradient buffers
        inputs = (x.detach().clone(), y.detach().clone())
        groups = self.optimizer.param_groups
        self.written = [float(group["lr"]) for group in groups]
        self.rates = [torch.tensor(lr, dtype=torch.float32, device=x.device) for lr in self.written]  # fused kernels read float32
        rates = self.rates

        def body() -> None:
            with tensor_rates(self.optimizer, rates):
                step(*inputs)

        try:
            replay = self.record(body)
        except (RuntimeError, AssertionError) as err:  # a host read in the model, loss or optimizer, say
            self.failed = True
            self.optimizer.zero_grad(set_to_none=True)
            first = first_line(err)
            then = "graphing the model alone" if self.fallback is not None else "training eagerly"
            warnings.warn(
                f"train.cuda_graphs: the training step of {type(self.model).__name__} could not be captured ({first}); {then}", stacklevel=3
            )
            return
        self.replay, self.inputs, self.shape, self.held = replay, inputs, shape, (step, parts)
        self.captures += 1

    def write_rates(self) -> None:
        """Fill the graph's learning-rate tensors where the schedule changed a param group's lr."""
        for i, group in enumerate(self.optimizer.param_groups):
            lr = float(group["lr"])
            if lr != self.written[i]:
                self.rates[i].fill_(lr)
                self.written[i] = lr


def baked_settings(optimizer: torch.optim.Optimizer) -> tuple[Any, ...]:
    """The param groups' settings a recorded step keeps as constants: all but the parameters and
    the learning rate (tensors by identity)."""
    return tuple(
        tuple((k, id(v) if isinstance(v, torch.Tensor) else v) for k, v in group.items() if k not in ("params", "lr"))
        for group in optimizer.param_groups
    )


@contextlib.contextmanager
def tensor_rates(optimizer: torch.optim.Optimizer, rates: list[torch.Tensor]) -> Iterator[None]:
    """The optimizer reads each group's learning rate from `rates` (and Adam's capture check
    passes: `capturable`), then the groups get their own values back."""
    saved = [(group["lr"], group.get("capturable")) for group in optimizer.param_groups]
    try:
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
            if "capturable" in group:
                group["capturable"] = True
        yield
    finally:
        for group, (lr, capturable) in zip(optimizer.param_groups, saved, strict=True):
            group["lr"] = lr
            if capturable is not None:
                group["capturable"] = capturable


def steps_can_be_graphed(optimizer: torch.optim.Optimizer, scheduler: Any) -> bool:
    """Whether GraphedStep can record this training step: a fused SGD, Adam or AdamW (a tensor
    learning rate; a step skipped on the device, also by an fp16 loss scaler, which reads nothing
    on the host with them) and no schedule of the momentum."""
    fused = type(optimizer) in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW) and all(
        group.get("fused") for group in optimizer.param_groups
    )
    return fused and not cycles_momentum(scheduler)


def cycles_momentum(scheduler: Any) -> bool:
    """Whether `scheduler` (or one it chains) changes the momentum every step (one-cycle does)."""
    if getattr(scheduler, "cycle_momentum", False):
        return True
    return any(cycles_momentum(s) for s in getattr(scheduler, "_schedulers", ()))
