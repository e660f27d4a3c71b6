"""Optimizer, learning-rate schedule and loss registries, and their builders."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

from deepfit.config import SchedConfig
from deepfit.errors import ConfigError
from deepfit.registry import Registry

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

OPTIMIZERS: Registry[Callable[..., Optimizer]] = Registry("optimizer")
SCHEDULERS: Registry[Callable[..., lrs.LRScheduler | lrs.ReduceLROnPlateau | None]] = Registry("scheduler")
LOSSES: Registry[Callable[..., LossFn]] = Registry("loss")


# --- optimizers: keyword-only builders over parameter groups ---------------------------------


@OPTIMIZERS.register("sgd")
def build_sgd(
    params: ParamsT, *, lr: float, momentum: float, nesterov: bool, weight_decay: float, fused: bool = False, **_: Any
) -> Optimizer:
    """Fused where the device has the kernel: one launch per step, and the non-finite guard skips a step on the device."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, weight_decay=weight_decay, fused=fused)


@OPTIMIZERS.register("adam")
def build_adam(params: ParamsT, *, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool, **_: Any) -> Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


@OPTIMIZERS.register("adamw")
def build_adamw(params: ParamsT, *, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool, **_: Any) -> Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


@OPTIMIZERS.register("rmsprop")
def build_rmsprop(params: ParamsT, *, lr: float, momentum: float, weight_decay: float, **_: Any) -> Optimizer:
    return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


@OPTIMIZERS.register("adagrad")
def build_adagrad(params: ParamsT, *, lr: float, weight_decay: float, **_: Any) -> Optimizer:
    return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("adadelta")
def build_adadelta(params: ParamsT, *, lr: float, weight_decay: float, **_: Any) -> Optimizer:
    return torch.optim.Adadelta(params, lr=lr, weight_decay=weight_decay)


def build_optimizer(
    name: str,
    params: ParamsT,
    *,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    device: torch.device | None = None,
) -> Optimizer:
    """The registered optimizer `name`; fused Adam/AdamW/SGD kernels where the device has them (CPU: 2.5x
    faster Adam step; they also let the non-finite guard skip a step without a host sync)."""
    fused = device is not None and device.type in ("cpu", "cuda")
    return OPTIMIZERS.get(name)(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas, fused=fused)


# --- schedules: every registered one steps per optimizer step (epoch settings are converted to
# steps) except plateau, which fit() steps once per epoch with the monitored metric ------------


@dataclass(frozen=True)
class ScheduleSpan:
    """How long training runs, in optimizer steps, for turning epoch-based settings into steps."""

    steps_per_epoch: int
    epochs: int

    @property
    def total(self) -> int:
        return self.steps_per_epoch * self.epochs


@SCHEDULERS.register("none")
def build_no_schedule(optimizer: Optimizer, *, span: ScheduleSpan, **_: Any) -> None:
    return None


@SCHEDULERS.register("step")
def build_step(optimizer: Optimizer, *, span: ScheduleSpan, step_size: int, gamma: float, **_: Any) -> lrs.LRScheduler:
    return lrs.StepLR(optimizer, step_size=max(1, step_size * span.steps_per_epoch), gamma=gamma)


@SCHEDULERS.register("multistep")
def build_multistep(optimizer: Optimizer, *, span: ScheduleSpan, milestones: list[int], gamma: float, **_: Any) -> lrs.LRScheduler:
    return lrs.MultiStepLR(optimizer, milestones=[m * span.steps_per_epoch for m in milestones], gamma=gamma)


@SCHEDULERS.register("exponential")
def build_exponential(optimizer: Optimizer, *, span: ScheduleSpan, gamma: float, **_: Any) -> lrs.LRScheduler:
    return lrs.ExponentialLR(optimizer, gamma=gamma ** (1.0 / span.steps_per_epoch))  # gamma per epoch


@SCHEDULERS.register("cosine")
def build_cosine(optimizer: Optimizer, *, span: ScheduleSpan, min_lr: float, **_: Any) -> lrs.LRScheduler:
    return lrs.CosineAnnealingLR(optimizer, T_max=max(1, span.total), eta_min=min_lr)


@SCHEDULERS.register("onecycle")
def build_onecycle(optimizer: Optimizer, *, span: ScheduleSpan, max_lr: float | None, pct_start: float, **_: Any) -> lrs.LRScheduler:
    """Peaks at each group's lr, or at max_lr scaled by each group's share of the base lr (so a
    backbone group at lr * 0.1 peaks at max_lr * 0.1)."""
    scale = 1.0 if max_lr is None else max_lr / optimizer.defaults["lr"]
    peak = [group["lr"] * scale for group in optimizer.param_groups]
    total = max(3, span.total)
    # torch divides by the length of each phase: with a few steps (a tiny dataset) keep both >= 1/2 step
    pct = min(max(pct_start, 1.5 / total), 1.0 - 1.5 / total)
    return lrs.OneCycleLR(optimizer, max_lr=peak, total_steps=total, pct_start=pct, cycle_momentum=has_momentum(optimizer))


@SCHEDULERS.register("linear")
def build_linear(
    optimizer: Optimizer, *, span: ScheduleSpan, pct_start: float, start_factor: float = 0.1, end_factor: float = 0.0, **_: Any
) -> lrs.LRScheduler:
    """One-cycle's shape in straight lines (airbench's schedule): each group's lr rises from
    start_factor x its lr to its lr over pct_start of the steps, then falls to end_factor x its lr
    at the last step. Momentum stays as the optimizer sets it (one-cycle cycles it)."""
    total = max(1, span.total)
    peak = min(max(pct_start, 0.0), 1.0) * total

    def factor(step: int) -> float:
        if step < peak:
            return start_factor + (1.0 - start_factor) * step / peak
        return end_factor + (1.0 - end_factor) * max(total - step, 0) / max(total - peak, 1.0)

    return lrs.LambdaLR(optimizer, factor)


def has_momentum(optimizer: Optimizer) -> bool:
    """Whether one-cycle may cycle the momentum: Adam-style betas, or a momentum the user turned on.
    Adagrad and Adadelta have neither (torch raises), and cycling an SGD or RMSprop momentum of 0
    would switch on a momentum the config turned off."""
    if "betas" in optimizer.defaults:
        return True
    return float(optimizer.defaults.get("momentum", 0.0) or 0.0) > 0.0


@SCHEDULERS.register("plateau")
def build_plateau(
    optimizer: Optimizer, *, span: ScheduleSpan, patience: int, factor: float, mode: Literal["min", "max"] = "max", **_: Any
) -> lrs.ReduceLROnPlateau:
    return lrs.ReduceLROnPlateau(optimizer, mode=mode, patience=patience, factor=factor)


def build_scheduler(
    name: str, optimizer: Optimizer, *, span: ScheduleSpan, warmup_epochs: float = 0.0, **options: Any
) -> lrs.LRScheduler | lrs.ReduceLROnPlateau | None:
    """The registered schedule, optionally after a linear warm-up from lr/10 (not for plateau)."""
    main = SCHEDULERS.get(name)(optimizer, span=span, **options)
    warmup_steps = round(warmup_epochs * span.steps_per_epoch)
    if warmup_steps <= 0 or isinstance(main, lrs.ReduceLROnPlateau):
        return main
    warmup = lrs.LinearLR(optimizer, start_factor=0.1, total_iters=warmup_steps)
    if main is None:
        return warmup
    return lrs.SequentialLR(optimizer, schedulers=[warmup, main], milestones=[warmup_steps])


def schedule_from_config(
    sched: SchedConfig, optimizer: Optimizer, *, span: ScheduleSpan, mode: Literal["min", "max"]
) -> lrs.LRScheduler | lrs.ReduceLROnPlateau | None:
    """config.sched's schedule; `mode` says whether the monitored metric (for plateau) falls or rises."""
    options = dataclasses.asdict(sched)
    return build_scheduler(options.pop("name"), optimizer, span=span, mode=mode, **options)


# --- schedules given through the Python API: fit(config, scheduler=...) -----------------------

SchedulerLike = lrs.LRScheduler | lrs.ReduceLROnPlateau
Interval = Literal["epoch", "step"]


@dataclass(frozen=True)
class Schedule:
    """A schedule for fit(config, scheduler=...), stepped after every epoch (PyTorch's usual
    `scheduler.step()` after each epoch; the default) or after every optimizer step
    (interval="step", e.g. OneCycleLR with total_steps). `scheduler` is one of
    - a torch.optim.lr_scheduler object built on the optimizer passed as fit(optimizer=...);
    - a scheduler class or functools.partial of one, called with fit's optimizer;
    - a function of the epoch (or step) count returning a factor of the base lr (-> LambdaLR).
    A ReduceLROnPlateau is stepped per epoch with the monitored metric."""

    scheduler: Any
    interval: Interval = "epoch"


def resolve_schedule(spec: Any, optimizer: Optimizer) -> tuple[SchedulerLike, Interval]:
    """A scheduler bound to `optimizer` and when to step it, from anything Schedule accepts."""
    schedule = spec if isinstance(spec, Schedule) else Schedule(spec)
    given, interval = schedule.scheduler, schedule.interval
    if interval not in ("epoch", "step"):
        raise ConfigError(f"Schedule interval must be 'epoch' or 'step'; got {interval!r}")
    if isinstance(given, (lrs.LRScheduler, lrs.ReduceLROnPlateau)):
        scheduler = given
    elif is_scheduler_factory(given):
        scheduler = given(optimizer)
    elif callable(given):
        scheduler = lrs.LambdaLR(optimizer, given)
    else:
        raise ConfigError(f"scheduler must be an lr_scheduler object, class or partial, or a function of the epoch; got {given!r}")
    if scheduler.optimizer is not optimizer:
        raise ConfigError(
            "the scheduler was built on another optimizer; pass that optimizer as fit(optimizer=...), or pass a class/partial"
        )
    if isinstance(scheduler, lrs.ReduceLROnPlateau) and interval == "step":
        raise ConfigError("ReduceLROnPlateau steps once per epoch on the monitored metric; use interval='epoch'")
    return scheduler, interval


def is_scheduler_factory(value: Any) -> bool:
    """A scheduler class, or a functools.partial of one (called with the optimizer)."""
    if isinstance(value, functools.partial):
        return is_scheduler_factory(value.func)
    return isinstance(value, type) and issubclass(value, (lrs.LRScheduler, lrs.ReduceLROnPlateau))


def step_epoch_schedule(scheduler: SchedulerLike, metric: float) -> None:
    """The end-of-epoch step: ReduceLROnPlateau reads the monitored metric, the others just step."""
    if isinstance(scheduler, lrs.ReduceLROnPlateau):
        scheduler.step(metric)
    else:
        scheduler.step()


# --- losses: all take raw logits (B, K) and integer labels (B,) -----------------------------


@LOSSES.register("cross_entropy")
def build_cross_entropy(*, label_smoothing: float = 0.0, weight: torch.Tensor | None = None, **_: Any) -> LossFn:
    """Integer labels (B,) or class shares (B, K), e.g. mixed targets; `weight` (K,) per class."""
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


@LOSSES.register("nll")
def build_nll(*, weight: torch.Tensor | None = None, **_: Any) -> LossFn:
    nll = nn.NLLLoss(weight=weight)
    return lambda logits, y: nll(torch.log_softmax(logits, dim=1), y)


@LOSSES.register("bce")
def build_bce(**_: Any) -> LossFn:
    """Binary cross-entropy of each class's sigmoid against one-hot targets."""
    bce = nn.BCEWithLogitsLoss()
    return lambda logits, y: bce(logits, nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype))


@LOSSES.register("mse")
def build_mse(**_: Any) -> LossFn:
    """Squared error between sigmoid outputs and one-hot targets, as in the first MNIST lesson."""
    mse = nn.MSELoss()
    return lambda logits, y: mse(torch.sigmoid(logits), nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype))


WEIGHTED_LOSSES = ("cross_entropy", "nll")  # the losses that take per-class weights


def build_loss(name: str, *, label_smoothing: float = 0.0, weight: torch.Tensor | None = None) -> LossFn:
    """The registered loss `name`; `weight` (K,) on the training device weighs each class's terms."""
    if weight is not None and name not in WEIGHTED_LOSSES:
        raise ConfigError(f"loss.class_weights works with loss.name {' or '.join(WEIGHTED_LOSSES)}; got {name}")
    return LOSSES.get(name)(label_smoothing=label_smoothing, weight=weight)


def list_optimizers() -> list[str]:
    return OPTIMIZERS.names()


def list_schedulers() -> list[str]:
    return SCHEDULERS.names()


def list_losses() -> list[str]:
    return LOSSES.names()
