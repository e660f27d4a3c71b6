"""train.cuda_graphs: a model's training forward and backward replayed as CUDA graphs.

A small model on a GPU spends its step launching kernels, not running them (cnn_bn on an H200,
batch 128: about 88 launches a step, the GPU busy a quarter of the time). torch's
`make_graphed_callables` records the forward and the backward once and replays each as one
launch. Only the model is graphed: the loss, the non-finite guard, the optimizer, the schedule,
lookahead and EMA stay the eager code they are without graphs, so what they promise holds.

A capture is made for the first batch and kept while the batches keep its shape and the model the
same trainable parameters; a batch of another shape (the last, partial one) runs eagerly, and a
change of trainable parameters (airbench_whiten's stem bias stopping) captures again. The capture's
warm-up passes would move BatchNorm's running statistics and draw dropout masks: both are put back,
so a graphed run trains on what an eager one does."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

Capture = Callable[..., Any]  # torch.cuda.make_graphed_callables(module, (sample,), num_warmup_iters=...)
Forward = Callable[[torch.Tensor], torch.Tensor]


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
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
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
