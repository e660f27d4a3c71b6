"""The training and evaluation loops: plain PyTorch over any nn.Module and any iterable of
(x, y) batches. No files, no prints; loss and accuracy are summed on the device and read once
per epoch, and the non-finite guard lives on the device too (FiniteGuard), so the loop never
waits on the host per batch. A step is either eager_step (op by op) or, with StepOptions.steps,
captured_step's device work replayed as one CUDA graph (cudagraphs.GraphedStep)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from deepfit.config import TTA_MODES
from deepfit.cudagraphs import GraphedForward, GraphedStep
from deepfit.errors import ConfigError, NonFiniteError
from deepfit.runtime import autocast

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepOptions:
    """How one optimizer step is taken; defaults are the plain fp32 loop."""

    scheduler: LRScheduler | None = None  # stepped after every optimizer step
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (CUDA)
    autocast_dtype: torch.dtype | None = None  # bf16/fp16 autocast, None for fp32
    clip_grad: float = 0.0  # max gradient norm, 0 for no clipping
    accumulate: int = 1  # batches per optimizer step
    check_finite: bool = True  # stop on a NaN/inf loss or gradient
    check_every: int = 32  # batches between reads of the guard's device flag (one host sync each)
    guard: FiniteGuard | None = None  # the run's guard (default: a new one per call when check_finite)
    graphs: GraphedForward | None = None  # the model's forward and backward as CUDA graphs (train.cuda_graphs); None: eager
    steps: GraphedStep | None = None  # the whole step as one CUDA graph (train.cuda_graphs where it can), not with `graphs`
    totals: Totals | None = None  # the epoch's loss and accuracy sums (default: new ones per call); kept across epochs for `steps`


class Fault(NamedTuple):
    """The first non-finite value a guard saw: ordered by batch, a loss before a gradient."""

    batch: float  # the batch that showed it; inf when it is no longer remembered
    kind: int  # FiniteGuard.LOSS or FiniteGuard.GRADIENT
    what: str  # "the loss became inf at batch 3"


Agree = Callable[[Fault | None], Fault | None]  # this process's fault -> the one every rank stops on


class FiniteGuard:
    """The non-finite guard, kept on the device so no step waits for the host. Each batch's loss and
    each step's gradients are checked by torch's fused check (the one GradScaler uses), which sets
    a sticky flag, `found`: once it is set, every optimizer step is skipped on the device (fused
    optimizers take it as `found_inf` and leave weights and state, step count included,
    untouched), so the weights stay those of the last good step. Per step that is a few kernels
    and no gradient norm. Counters of the checks made since the flag went up, with the batch
    numbers of the latest checks kept on the host, give the first bad batch and its kind when
    `check()` reads them (one host sync): the loop calls it every `check_every` batches and at the
    epoch's end, and fit before every checkpoint it writes. `agree` makes the ranks of a
    data-parallel run decide together: a loss that is inf with finite gradients trips one rank's
    guard only, and every rank must stop at the same check, before any checkpoint after it."""

    LOSS, GRADIENT = 0, 1  # kinds of fault
    WINDOW = 64  # checks of each kind remembered: check() must come at least this often

    def __init__(self, device: torch.device, agree: Agree | None = None) -> None:
        self.agree = agree
        self.found = torch.zeros((), device=device)  # 1.0 once a checked value was NaN/inf
        self.one = torch.ones((), device=device)  # the check's unscale factor: values are left as they are
        self.since = torch.zeros(2, device=device)  # [LOSS, GRADIENT]: checks made while `found` was set
        self.losses = torch.zeros(self.WINDOW, device=device)  # the latest losses, for the message
        self.last = torch.zeros(1, device=device)  # a captured step's loss, until replayed() keeps it in `losses`
        self.batches: tuple[deque[int], deque[int]] = (deque(maxlen=self.WINDOW), deque(maxlen=self.WINDOW))
        self.loss_checks = 0
        self.fused = device.type in ("cpu", "cuda")  # torch's fused check has kernels there; elsewhere (mps) plain ops
        self.checked: tuple[nn.Module | None, list[nn.Parameter]] = (None, [])  # the model checked and its parameters

    @property
    def tripped(self) -> torch.Tensor:
        """bool () on the device: a fault was seen; every later update is skipped."""
        return self.found > 0

    def record_loss(self, batch: int, loss: torch.Tensor) -> None:
        """Check `batch`'s loss (shape ()); no sync."""
        value = self.loss_slot()
        value.copy_(loss.detach().reshape(1))
        self.flag([value], self.LOSS)
        self.noted(self.LOSS, batch)

    def check_loss(self, loss: torch.Tensor) -> None:
        """record_loss's device half, for a captured step: the value waits in `last` for replayed()."""
        self.last.copy_(loss.detach().reshape(1))
        self.flag([self.last], self.LOSS)

    def replayed(self, batch: int, *, gradients: bool = True) -> None:
        """record_loss's (and with `gradients`, record_gradients') host half, after a captured step
        (check_loss, check_gradients) was replayed for `batch`."""
        self.loss_slot().copy_(self.last)
        self.noted(self.LOSS, batch)
        if gradients:
            self.noted(self.GRADIENT, batch)

    def loss_slot(self) -> torch.Tensor:
        """The next slot of the window of latest losses, (1,)."""
        slot = self.loss_checks % self.WINDOW
        self.loss_checks += 1
        return self.losses[slot : slot + 1]

    def record_gradients(self, batch: int, model: nn.Module) -> None:
        """Check every gradient of `model` after `batch`'s backward pass; no sync."""
        self.check_gradients(model)
        self.noted(self.GRADIENT, batch)

    def check_gradients(self, model: nn.Module) -> None:
        """record_gradients' device half."""
        grads = [
            p.grad._values() if p.grad.is_sparse else p.grad for p in self.parameters_of(model) if p.grad is not None
        ]  # sparse: its stored values
        if any(g.device != self.found.device for g in grads):  # one fused check needs one device
            grads = [torch.nn.utils.get_total_norm(grads).to(self.found.device).reshape(1)]
        self.flag(grads, self.GRADIENT)

    def parameters_of(self, model: nn.Module) -> list[nn.Parameter]:
        """model.parameters() as a list, made once per model rather than walking the module tree
        every step (12 us of Python a step for cnn_bn on a Zen 5 core: a tenth of the guard's host time)."""
        if self.checked[0] is not model:
            self.checked = (model, list(model.parameters()))
        return self.checked[1]

    def flag(self, values: list[torch.Tensor], kind: int) -> None:
        """Raise `found` if a value is NaN/inf and count a check of `kind` made with it up; device only."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for value in values:  # one launch per dtype, as GradScaler groups them
            by_dtype.setdefault(value.dtype, []).append(value)
        for group in by_dtype.values():
            if self.fused:
                torch._amp_foreach_non_finite_check_and_unscale_(group, self.found, self.one)
            else:
                bad = torch.stack([~torch.isfinite(v).all() for v in group]).any()
                self.found.copy_(torch.maximum(self.found, bad.float()))
        self.since[kind : kind + 1].add_(self.found)

    def noted(self, kind: int, batch: int) -> None:
        """Remember that `batch` was checked for `kind` (host only)."""
        self.batches[kind].append(batch)

    def check(self) -> None:
        """Raise NonFiniteError if a fault was recorded, here or (with `agree`) on any rank."""
        fault = self.fault()
        if self.agree is not None:
            fault = self.agree(fault)
        if fault is not None:
            raise NonFiniteError(f"{fault.what}; lower the learning rate or enable --train.clip-grad")

    def fault(self) -> Fault | None:
        """The first fault recorded, if any (one read of three device values)."""
        found, since_loss, since_grad = torch.cat([self.found.view(1), self.since]).tolist()
        if not found:
            return None
        loss_at, grad_at = self.first_bad(self.LOSS, int(since_loss)), self.first_bad(self.GRADIENT, int(since_grad))
        if loss_at is not None and (grad_at is None or loss_at <= grad_at):
            value = float(self.losses[(self.loss_checks - int(since_loss)) % self.WINDOW])
            return Fault(loss_at, self.LOSS, f"the loss became {value} at batch {loss_at}")
        if grad_at is not None:
            return Fault(grad_at, self.GRADIENT, f"a gradient became non-finite at batch {grad_at}")
        return Fault(math.inf, self.GRADIENT, f"a gradient became non-finite within the last {self.WINDOW} batches")

    def first_bad(self, kind: int, since: int) -> int | None:
        """The batch whose check of `kind` first saw the flag up, if remembered."""
        seen = self.batches[kind]
        return seen[-since] if 0 < since <= len(seen) else None


class Totals:
    """An epoch's summed train loss (weighted by rows) and correct predictions, on the device.
    Predictions are counted only for class scores: a model of one output (a number, as in
    regression, or one logit) has no accuracy. Which it is, is decided at the first batch (the
    outputs' kind does not change between batches), not per step."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.classified: bool | None = None  # None until the first batch

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss.add_(loss.detach(), alpha=len(y))
        if self.classified is None:
            self.classified = classifies(logits, y)
        if self.classified:
            self.correct.add_((logits.argmax(1) == (y if y.dim() == 1 else y.argmax(1))).sum())  # mixed targets (B, K): their larger share

    def accuracy(self, seen: int) -> float:
        return float(self.correct) / max(seen, 1) if self.classified else math.nan

    def zero_(self) -> None:
        self.loss.zero_()
        self.correct.zero_()


def classifies(logits: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether (logits, y) are class scores (B, K >= 2) and labels: indices (B,), or shares (B, K)."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        return False
    return (y.dim() == 1 and not y.is_floating_point()) or y.shape == logits.shape


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    optimizer: Optimizer,
    loss_fn: LossFn,
    *,
    options: StepOptions | None = None,
    on_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass over `batches`; returns mean train loss and accuracy over the images seen (NaN
    where the model's outputs are not class scores: Totals)."""
    opts = options or StepOptions()
    require_recordable(model, optimizer, opts)
    forward = graphed_forward(model, opts)
    model.train()
    device = next(model.parameters()).device
    guard = opts.guard or (FiniteGuard(device) if opts.check_finite else None)
    totals = opts.totals or Totals(device)
    totals.zero_()
    seen, last = 0, len(batches) if hasattr(batches, "__len__") else -1  # type: ignore[arg-type]
    check_every = max(min(opts.check_every, guard.WINDOW), 1) if guard is not None else 0  # it remembers WINDOW checks
    whole = captured_step(model, optimizer, loss_fn, opts, guard, totals)
    for i, (x, y) in enumerate(batches):
        if opts.steps is not None and opts.steps.run(x, y, whole, (loss_fn, opts, guard, totals)):
            after_replay(opts, guard, batch=i + 1)
        else:
            eager_step(model, forward, (x, y), optimizer, loss_fn, opts, guard, totals, batch=i + 1, last=last)
        seen += len(y)
        if guard is not None and (i + 1) % check_every == 0:
            guard.check()
        if on_step is not None:
            on_step()
    if guard is not None:
        guard.check()
    return {"loss": float(totals.loss) / max(seen, 1), "acc": totals.accuracy(seen)}


def eager_step(
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch_xy: tuple[torch.Tensor, torch.Tensor],
    optimizer: Optimizer,
    loss_fn: LossFn,
    opts: StepOptions,
    guard: FiniteGuard | None,
    totals: Totals,
    *,
    batch: int,
    last: int,
) -> None:
    """Batch `batch` (1-based) of `last` trained op by op: forward, loss, backward, and the optimizer
    step when the batches it accumulates are in (or the epoch ends)."""
    x, y = batch_xy
    with autocast(totals.loss.device, opts.autocast_dtype):
        logits = forward(x)
        if batch == 1:
            require_tensor(logits, model)
        loss = loss_fn(logits, y)
    if guard is not None:
        guard.record_loss(batch, loss)
    backward(loss / opts.accumulate if opts.accumulate > 1 else loss, opts.scaler)  # no divide-by-1 kernels
    if batch % opts.accumulate == 0 or batch == last:
        optimizer_step(model, optimizer, opts, guard, batch=batch)
    totals.add(loss, logits, y)


def require_tensor(logits: object, model: nn.Module) -> None:
    """A model that returns more than its logits in training mode (Inception's auxiliary outputs, a
    dict) passes the evaluation-mode check before the run (fitparts.require_logits): stop in one
    line at its first training batch, not in the loss function's TypeError."""
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(
            f"your model {type(model).__name__} returns a {type(logits).__name__} in training mode; deepfit trains on one"
            " tensor of logits (batch, classes): return it alone in training too"
        )


def captured_step(
    model: nn.Module, optimizer: Optimizer, loss_fn: LossFn, opts: StepOptions, guard: FiniteGuard | None, totals: Totals
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One step's device work with no host read and no Python state per batch, for a CUDA graph
    (opts.steps): forward, loss, the guard's checks, backward, the weights' update, the totals.
    The gradients are left in place (the graph writes them anew each replay); the guard's batch
    numbers and the schedule are after_replay's."""
    device = totals.loss.device

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=opts.autocast_dtype, enabled=opts.autocast_dtype is not None, cache_enabled=False):
            logits = model(x)
            loss = loss_fn(logits, y)
        if guard is not None:
            guard.check_loss(loss)
        backward(loss, opts.scaler)
        update_weights(model, optimizer, opts, guard)
        totals.add(loss, logits, y)

    return step


def after_replay(opts: StepOptions, guard: FiniteGuard | None, *, batch: int) -> None:
    """The host half of a replayed step: the guard's notes and the schedule."""
    if guard is not None:
        guard.replayed(batch, gradients=opts.scaler is None)  # with a scaler an overflow is normal: gradients are not checked
    if opts.scheduler is not None:
        opts.scheduler.step()


def graphed_forward(model: nn.Module, opts: StepOptions) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the loop calls for logits: the model, or its CUDA graphs when opts.graphs holds them
    (or opts.steps, once it could not record the step, holds them as its fallback)."""
    if opts.steps is not None:
        return opts.steps.forward
    if opts.graphs is None:
        return model
    if opts.graphs.model is not model:
        raise ValueError("StepOptions.graphs must wrap the model being trained")
    if opts.accumulate > 1:
        raise ValueError("CUDA graphs replay into the same gradient buffers: they cannot accumulate over batches (accumulate > 1)")
    return opts.graphs


def require_recordable(model: nn.Module, optimizer: Optimizer, opts: StepOptions) -> None:
    """opts.steps records the step of this model and optimizer alone, one optimizer step per batch, unscaled."""
    if opts.steps is None:
        return
    if opts.steps.model is not model or opts.steps.optimizer is not optimizer or opts.graphs is not None:
        raise ValueError("StepOptions.steps must wrap the model and optimizer being trained, without StepOptions.graphs")
    if opts.accumulate > 1:
        raise ValueError("a recorded step takes one optimizer step per batch: no accumulate > 1")


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()


def optimizer_step(model: nn.Module, optimizer: Optimizer, opts: StepOptions, guard: FiniteGuard | None = None, *, batch: int = 0) -> None:
    """Unscale, check and clip the gradients, step (skipped on the device once `guard` has seen a
    fault), clear them, advance the schedule."""
    if guard is not None and opts.scaler is None:  # noted first: an unfused optimizer's step reads the guard
        guard.noted(guard.GRADIENT, batch)
    update_weights(model, optimizer, opts, guard)
    optimizer.zero_grad(set_to_none=True)
    if opts.scheduler is not None:
        opts.scheduler.step()


def update_weights(model: nn.Module, optimizer: Optimizer, opts: StepOptions, guard: FiniteGuard | None) -> None:
    """optimizer_step's device work: unscale, check and clip the gradients, step unless `guard`
    has seen a fault. (The check's batch number is the caller's to note.)"""
    if opts.scaler is not None:
        if guard is not None:
            poison(model, guard.tripped)  # the scaler then skips the step as it skips an overflow
        opts.scaler.unscale_(optimizer)
    if opts.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.clip_grad)
    if guard is not None and opts.scaler is None:  # with a scaler an overflow is normal: it skips the step
        guard.check_gradients(model)
    if opts.scaler is not None:
        opts.scaler.step(optimizer)
        opts.scaler.update()
    elif guard is not None:
        step_unless(optimizer, guard)
    else:
        optimizer.step()


def step_unless(optimizer: Optimizer, guard: FiniteGuard) -> None:
    """optimizer.step() unless the guard has tripped. Fused optimizers (deepfit's adam, adamw, sgd)
    take the flag as GradScaler's `found_inf` and skip on the device; any other optimizer needs a
    host read of the flag before its step (the one sync per step left)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        guard.check()
        optimizer.step()
        return
    optimizer.found_inf = guard.found  # type: ignore[attr-defined]
    optimizer.grad_scale = None  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]


def poison(model: nn.Module, tripped: torch.Tensor) -> None:
    """Make one gradient NaN when `tripped` (bool ()), without a sync: a GradScaler skips the step."""
    grad = next((p.grad for p in model.parameters() if p.grad is not None), None)
    if grad is not None:
        grad.masked_fill_(tripped, float("nan"))


SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # (dx, dy) of the one-pixel translations 'shift' adds


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The copies of a (B, C, H, W) batch whose logits test-time augmentation averages: the batch
    itself; with 'flip' also its left-right mirror; with 'shift' also copies moved one pixel right,
    left, down and up, the uncovered edge repeating its neighbour; 'flip-shift' shifts both."""
    if mode not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {mode!r}; valid: {', '.join(TTA_MODES)}")
    bases = [x, x.flip(3)] if "flip" in mode else [x]
    if "shift" not in mode:
        return bases
    return [view for base in bases for view in (base, *shifted_copies(base))]


def shifted_copies(x: torch.Tensor) -> list[torch.Tensor]:
    """x moved by each of SHIFTS: a window of the edge-replicated (B, C, H+2, W+2) batch."""
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    h, w = x.shape[-2:]
    return [padded[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w] for dx, dy in SHIFTS]


def view_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str) -> torch.Tensor:
    """float32 logits of a batch averaged over its tta_views; with mode 'none', the model's own.
    `model`: a module, or any batch -> logits function (serve's onnxruntime session)."""
    if mode == "none":
        return model(x).float()
    return torch.stack([model(view).float() for view in tta_views(x, mode)]).mean(0)


@torch.inference_mode()
def predict_logits(
    model: nn.Module, batches: Batches, *, autocast_dtype: torch.dtype | None = None, tta: str | bool = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (N, K) in float32 and labels (N,) for `batches`, on the CPU.
    tta: average the logits of each image's copies (tta_views; True is 'flip', False 'none')."""
    mode = ("flip" if tta else "none") if isinstance(tta, bool) else tta
    model.eval()
    device = next(model.parameters()).device
    outputs, targets = [], []
    for x, y in batches:
        with autocast(device, autocast_dtype):
            outputs.append(view_logits(model, x, mode))
        targets.append(y)
    if not outputs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(outputs).cpu(), torch.cat(targets).cpu()


def evaluate(model: nn.Module, batches: Batches, loss_fn: LossFn, *, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Mean loss and accuracy of `model` over `batches`, without gradients (accuracy NaN where the
    outputs are not class scores and labels)."""
    logits, labels = predict_logits(model, batches, autocast_dtype=autocast_dtype)
    if len(labels) == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    acc = float((logits.argmax(1) == labels).float().mean()) if classifies(logits, labels) else math.nan
    return {"loss": float(loss_fn(logits, labels)), "acc": acc}
