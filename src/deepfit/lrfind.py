"""`deepfit lr-find`: an exponential learning-rate sweep (Leslie Smith's range test, as in fastai
and torch-lr-finder). One optimizer step per batch while the lr grows from start_lr to end_lr;
the smoothed loss is recorded, the sweep stops when it diverges, and the suggestion is the lr
of the lowest smoothed loss divided by 10. The caller's model is never touched: the sweep
trains a deep copy, and the global torch random state is restored afterwards."""

from __future__ import annotations

import copy
import csv
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from deepfit.checkpoint import LR_FIND_TABLE
from deepfit.config import Config, validate
from deepfit.data import BatchLoader, DataBundle, StreamLoader, build_data, build_loader, require_classes
from deepfit.engine import StepOptions, train_one_epoch
from deepfit.errors import ConfigError, NonFiniteError
from deepfit.fitparts import require_logits
from deepfit.models import build_model, freeze_backbone, parameter_groups
from deepfit.optim import LossFn, build_loss, build_optimizer
from deepfit.plots import save_figure
from deepfit.runtime import autocast_dtype, select_device, set_threads
from deepfit.trained import init_weights, place_model

DIVERGE_FACTOR = 4.0  # stop once the smoothed loss exceeds this many times its minimum (fastai's rule)
SMOOTHING_SHARE = 0.05  # the loss average spans this share of the sweep (200 steps: 10 batches)
SKIP_START = 10  # steps ignored by the steepest-descent estimate (the average is still settling)


@dataclass
class LRFindResult:
    lrs: list[float]  # the head's lr at each step
    losses: list[float]  # the training loss of each step's batch
    smoothed: list[float]  # exponential moving average of `losses`, bias-corrected
    suggestion: float  # lr at the lowest smoothed loss / 10
    steepest: float | None  # lr where the smoothed loss falls fastest against log(lr), for reference
    stopped: str  # why the sweep ended: "completed", "diverged" or "non-finite loss"
    start_lr: float
    end_lr: float
    steps: int  # steps asked for (len(lrs) may be fewer)
    files: list[Path] = field(default_factory=list)  # what save_lr_find wrote

    @property
    def min_loss_lr(self) -> float:
        return self.lrs[int(np.argmin(self.smoothed))]


class SweepEnd(Exception):
    """Raised from the per-step callback to end the sweep (divergence)."""


def find_lr(
    config: Config,
    *,
    model: nn.Module | None = None,
    data: DataBundle | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 200,
) -> LRFindResult:
    """Sweep the lr exponentially from start_lr to end_lr over `steps` batches with the optimizer,
    loss, augmentation, precision and model options of `config` (torch.compile is not used)."""
    validate(config)
    check_range(start_lr, end_lr, steps)
    set_threads(config.train.threads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        bundle = data if data is not None else build_data(config.data, seed=config.train.seed)
        require_classes(bundle)
        net = sweep_model(config, bundle, model)
        own = model is not None or bool(config.model.class_path)  # your own module: tried on the data's shape first, as fit does
        return sweep(config, bundle, net, start_lr=start_lr, end_lr=end_lr, steps=steps, own=own)


def check_range(start_lr: float, end_lr: float, steps: int) -> None:
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"lr-find needs 0 < start lr < end lr; got {start_lr:g} and {end_lr:g}")
    if steps < 2 * SKIP_START:
        raise ConfigError(f"lr-find needs at least {2 * SKIP_START} steps; got {steps}")


def sweep_model(config: Config, bundle: DataBundle, model: nn.Module | None) -> nn.Module:
    """A copy of the caller's model, or the registered one, prepared as fit() prepares it."""
    if model is not None:
        net = copy.deepcopy(model)
    else:
        net = build_model(config.model, input_shape=bundle.input_shape, num_classes=bundle.num_classes)
    if config.model.init_from:
        init_weights(net, config.model.init_from, classes=bundle.classes)
    if config.model.freeze == "backbone":
        freeze_backbone(net)
    return net


def sweep(
    config: Config, bundle: DataBundle, net: nn.Module, *, start_lr: float, end_lr: float, steps: int, own: bool = False
) -> LRFindResult:
    device = select_device(config.train.device)
    net, channels_last = place_model(net, config.model.channels_last, device)
    if own:
        require_logits(net, bundle, device, channels_last=channels_last)
    loader = build_loader(
        bundle.train, batch_size=config.data.batch_size, mean=bundle.mean, std=bundle.std, device=device,
        shuffle=True, augment=config.data.augment, seed=config.train.seed, channels_last=channels_last, crop_pad=config.data.crop_pad,
        pad_mode=config.data.pad_mode, flip=config.data.flip, num_workers=config.data.num_workers, skip_bad=config.data.skip_bad,
    )  # fmt: skip
    o = config.optim
    optimizer = build_optimizer(
        o.name, parameter_groups(net, lr=start_lr, config=config.model), lr=start_lr, momentum=o.momentum,
        nesterov=o.nesterov, weight_decay=o.weight_decay, betas=(o.betas[0], o.betas[1]), device=device,
    )  # fmt: skip
    growth = (end_lr / start_lr) ** (1.0 / (steps - 1))  # lr_i = start_lr * growth**i, i = 0..steps-1
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: growth**i)  # stepped by the engine after each step
    record = Recorder(build_loss(config.loss.name, label_smoothing=config.loss.label_smoothing), optimizer, smoothing(steps))
    options = StepOptions(
        scheduler=scheduler,
        autocast_dtype=autocast_dtype(config.train.precision, device),
        clip_grad=config.train.clip_grad,
        check_every=1,  # the recorder reads every loss anyway: stop at the first non-finite one
    )
    stopped = "completed"
    try:
        train_one_epoch(net, itertools.islice(endless(loader), steps), optimizer, record, options=options, on_step=record.check)
    except SweepEnd:
        stopped = "diverged"
    except NonFiniteError:
        stopped = "non-finite loss"
    return summarize(record, stopped, start_lr=start_lr, end_lr=end_lr, steps=steps)


def smoothing(steps: int) -> float:
    """Weight of the running loss average, so that it spans SMOOTHING_SHARE of the sweep: a fixed
    0.98 (fastai's) lags 50 steps, 4 of the 8 decades of a 100-step sweep, moving the minimum right."""
    return 1.0 - 1.0 / max(5.0, SMOOTHING_SHARE * steps)


def endless(loader: BatchLoader | StreamLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch after epoch of reshuffled batches (small datasets have fewer batches than the sweep)."""
    while True:
        yield from loader


class Recorder:
    """The loss function, wrapped to record each step's lr and loss and to stop on divergence."""

    def __init__(self, loss_fn: LossFn, optimizer: torch.optim.Optimizer, beta: float) -> None:
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.beta = beta
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.average = 0.0

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(logits, y)
        value = float(loss.detach())  # one host sync per step: the sweep needs every value
        self.lrs.append(float(self.optimizer.param_groups[0]["lr"]))
        self.losses.append(value)
        self.average = self.beta * self.average + (1 - self.beta) * value
        self.smoothed.append(self.average / (1 - self.beta ** len(self.losses)))
        return loss

    def check(self) -> None:
        """After each step: stop once the smoothed loss has blown up past DIVERGE_FACTOR x its minimum."""
        current = self.smoothed[-1]
        if len(self.smoothed) > SKIP_START and (current > DIVERGE_FACTOR * min(self.smoothed) or not math.isfinite(current)):
            raise SweepEnd


def summarize(record: Recorder, stopped: str, *, start_lr: float, end_lr: float, steps: int) -> LRFindResult:
    """Drop a trailing non-finite value, then pick the suggestion."""
    keep = [i for i, v in enumerate(record.smoothed) if math.isfinite(v)]
    lrs = [record.lrs[i] for i in keep]
    losses = [record.losses[i] for i in keep]
    smoothed = [record.smoothed[i] for i in keep]
    if len(smoothed) < 2:
        raise ConfigError(f"lr-find: the loss was not finite from the first steps (start lr {start_lr:g}); lower --start-lr")
    best = int(np.argmin(smoothed))
    return LRFindResult(lrs, losses, smoothed, lrs[best] / 10, steepest_lr(lrs, smoothed, best), stopped, start_lr, end_lr, steps)


def steepest_lr(lrs: list[float], smoothed: list[float], best: int) -> float | None:
    """The lr where d(smoothed loss)/d(log lr) is most negative, before the minimum."""
    if best - SKIP_START < 2:
        return None
    window = slice(SKIP_START, best + 1)
    slope = np.gradient(np.asarray(smoothed[window]), np.log(np.asarray(lrs[window])))
    return lrs[SKIP_START + int(np.argmin(slope))]


def plot_lr_find(result: LRFindResult) -> Figure:
    """Loss against learning rate (log x): raw per-batch losses faint, the smoothed curve, the suggestion."""
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=0.8, label="batch loss")
    ax.plot(result.lrs, result.smoothed, color="C0", linewidth=2, label="smoothed loss")
    ax.axvline(result.suggestion, color="C3", linestyle="--", label=f"suggested lr {result.suggestion:.2g} (min / 10)")
    if result.steepest is not None:
        ax.axvline(result.steepest, color="C2", linestyle=":", label=f"steepest descent {result.steepest:.2g}")
    ax.set_xscale("log")
    low, high = min(result.smoothed), max(result.smoothed[: max(2, len(result.smoothed) // 5)])
    if high > low:  # the start of the curve and its minimum in view, the blow-up clipped
        ax.set_ylim(low - 0.1 * (high - low), high + 0.2 * (high - low))
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"lr-find: {len(result.lrs)} steps, {result.stopped}")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def save_lr_find(result: LRFindResult, folder: Path) -> list[Path]:
    """folder/lr-find.png (the plot) and folder/lr-find.csv (step, lr, loss, smoothed)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / LR_FIND_TABLE
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "lr", "loss", "smoothed_loss"])
        for i, row in enumerate(zip(result.lrs, result.losses, result.smoothed, strict=True)):
            writer.writerow([i, *(f"{v:.6g}" for v in row)])
    result.files = [save_figure(plot_lr_find(result), folder / "lr-find.png"), table]
    return result.files
