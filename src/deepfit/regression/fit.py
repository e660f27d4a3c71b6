"""fit_regression(config) -> RegressionResult: read the table, split and standardise it, train
with deepfit.engine's loop (its accuracy column is meaningless here and dropped), checkpoint,
measure the test split in the target's units and draw the figures."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from deepfit import checkpoint as ckpt
from deepfit.config import Config, parse_duration, save_config, validate
from deepfit.engine import StepOptions, train_one_epoch
from deepfit.errors import ConfigError, StopRequested
from deepfit.history import Row, early_stop_reason, write_metrics_csv
from deepfit.interrupts import StopFlag
from deepfit.optim import ScheduleSpan, build_optimizer, schedule_from_config, step_epoch_schedule
from deepfit.regression.batches import RowBatches, predict_values
from deepfit.regression.models import build_regression_loss, build_regression_model, regression_metrics
from deepfit.regression.sources import anchored, load_regression_data
from deepfit.regression.split import RegressionData, Split
from deepfit.runtime import autocast_dtype, seed_everything, select_device, set_deterministic, set_threads
from deepfit.stopping import after_training, stoppable
from deepfit.tracking import Trackers, final_record, require_trackers, run_info, start_trackers

ProgressFn = Callable[[Iterable[Any], str, int], Iterable[Any]]
EpochFn = Callable[[Row], None]


@dataclass
class RegressionResult:
    model: nn.Module  # trained, on its device; takes standardised features (B, F) -> (B, 1)
    history: list[Row]  # one row per epoch, as in metrics.csv
    metrics: dict[str, float]  # test_mse, test_rmse, test_mae, test_r2 in the target's units
    run_dir: Path
    data: RegressionData
    stopped_early: str | None = None


@dataclass
class RegressionRun:
    config: Config
    data: RegressionData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: RowBatches
    loss_fn: nn.Module
    device: torch.device
    run_dir: Path
    epoch: int = 0
    step: int = 0
    best_metric: float = math.nan
    best_epoch: int = 0
    history: list[Row] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    stopped_early: str | None = None
    signals: StopFlag = field(default_factory=StopFlag)
    tracker: Trackers = field(default_factory=lambda: Trackers({}))  # train.log's TensorBoard / MLflow


def fit_regression(
    config: Config,
    *,
    resume: str | Path | None = None,
    progress: ProgressFn | None = None,
    on_epoch: EpochFn | None = None,
    on_start: Callable[[RegressionData], None] | None = None,
) -> RegressionResult:
    """Train config.model.name (linear, mlp) to predict a table's target; see default_config() for
    the regression defaults. `resume`: a run folder to continue from its checkpoints/last.pt.
    `on_start` sees the data once it is read and split, before the first epoch."""
    validate(config)
    config = anchored(config)
    set_threads(config.train.threads)
    set_deterministic(config.train.deterministic)  # before any CUDA work, as fit does
    seed_everything(config.train.seed)
    require_trackers(config.train.log)  # a missing package: one line, before any run folder exists
    run = prepare_run(config, resume)
    info = run_info(run.config, run.run_dir, step=run.step, resumed=resume is not None, history=run.history)
    with ckpt.holding(run.run_dir):  # the run folder is this process's until training returns or raises
        if on_start is not None:
            on_start(run.data)
        with start_trackers(run.config.train.log, info) as run.tracker:
            with stoppable(run.run_dir, lambda: save_state(run), finished=lambda: run.stopped_early == "time limit") as run.signals:
                train_epochs(run, progress, on_epoch)
            with after_training(run.run_dir):
                result = finish(run)
                run.tracker.log_final(run.step, final_record(run.config, run.run_dir, result.metrics, None))
    return result


def prepare_run(config: Config, resume: str | Path | None) -> RegressionRun:
    """Everything that can fail on bad input first; the run folder last."""
    saved = ckpt.load_resumed(Path(resume), config) if resume is not None else None
    device = select_device(config.train.device)
    data = load_regression_data(config)
    model = build_regression_model(config.model, num_features=data.num_features).to(device)
    batches = RowBatches(data.train.x, data.train.y, batch_size=config.data.batch_size, seed=config.train.seed, device=device)
    o = config.optim
    optimizer = build_optimizer(o.name, model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay, betas=(o.betas[0], o.betas[1]), device=device)  # fmt: skip
    scheduler = make_scheduler(config, optimizer, len(batches))
    loss_fn = build_regression_loss(config.loss.name)
    check_monitor(config, data)
    run_dir = Path(resume) if resume is not None else ckpt.new_run_dir(config.train.out, data=config.data.name, model=config.model.name)
    run = RegressionRun(config, data, model, optimizer, scheduler, batches, loss_fn, device, run_dir)
    with ckpt.claiming(run_dir):
        if saved is not None:
            ckpt.remove_stale_temps(run_dir / "checkpoints")
            restore(run, saved, run_dir / "checkpoints" / "last.pt")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    return run


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    s = config.sched
    mode: Literal["min", "max"] = "max" if monitor_higher(config.train.monitor) else "min"
    return schedule_from_config(s, optimizer, span=ScheduleSpan(steps_per_epoch, config.train.epochs), mode=mode)


METRICS = ("loss", "mse", "rmse", "mae", "r2")  # per split in metrics.csv; r2: higher is better, the others lower


def monitor_higher(key: str) -> bool:
    return key.endswith("r2")


def check_monitor(config: Config, data: RegressionData) -> None:
    valid = [f"{split}_{m}" for split in ("train", "val") for m in METRICS if split == "train" or data.val is not None]
    if config.train.monitor not in valid:
        raise ConfigError(f"train.monitor {config.train.monitor!r} is not a regression metric; valid: {', '.join(valid)}")


def train_epochs(run: RegressionRun, progress: ProgressFn | None, on_epoch: EpochFn | None) -> None:
    cfg = run.config.train
    per_epoch = isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    options = StepOptions(scheduler=None if per_epoch else run.scheduler, autocast_dtype=autocast_dtype(cfg.precision, run.device),
                          clip_grad=cfg.clip_grad, accumulate=cfg.accumulate)  # fmt: skip
    deadline = run.started + parse_duration(cfg.time_limit) if cfg.time_limit else math.inf
    while run.epoch < cfg.epochs and run.stopped_early is None:
        run.signals.check()
        started = time.monotonic()
        batches = progress(run.batches, f"epoch {run.epoch + 1}/{cfg.epochs}", len(run.batches)) if progress else run.batches
        train = train_one_epoch(run.model, batches, run.optimizer, run.loss_fn, options=options, on_step=lambda: after_step(run, deadline))
        run.epoch += 1
        row = epoch_row(run, train["loss"], time.monotonic() - started)
        if per_epoch:
            step_epoch_schedule(run.scheduler, row[cfg.monitor])
        end_epoch(run, row)
        if on_epoch is not None:
            on_epoch(row)
    if run.stopped_early is None:  # a signal during the last epoch's evaluation and save still stops the run
        run.signals.check()


def after_step(run: RegressionRun, deadline: float) -> None:
    run.step += 1
    every = run.config.train.checkpoint_every
    if every and run.step % every == 0 and run.batches.position < len(run.batches):
        save_state(run)
    run.signals.check()
    if time.monotonic() > deadline:
        run.stopped_early = "time limit"
        raise StopRequested(f"time limit {run.config.train.time_limit} reached")


def measure(run: RegressionRun, split: Split) -> dict[str, float]:
    """The loss as optimised (standardised units) and mse/rmse/mae/r2 in the target's units."""
    predicted = predict_values(run.model, split.x, batch_size=run.config.data.eval_batch_size)
    metrics = {"loss": float(run.loss_fn(predicted, split.y.cpu()))}
    scaling = run.data.scaling
    metrics.update(regression_metrics(scaling.undo_target(predicted), scaling.undo_target(split.y.cpu())))
    return metrics


def epoch_row(run: RegressionRun, train_loss: float, seconds: float) -> Row:
    """train_loss is the mean over the epoch's batches (as the optimizer saw them); the others are
    measured on the whole split after the epoch."""
    row: Row = {"epoch": float(run.epoch)}
    for key, value in measure(run, run.data.train).items():
        row[f"train_{key}"] = value
    row["train_loss"] = train_loss
    if run.data.val is not None:
        row.update({f"val_{key}": value for key, value in measure(run, run.data.val).items()})
    row["lr"] = float(run.optimizer.param_groups[0]["lr"])
    row["seconds"] = seconds
    return row


def end_epoch(run: RegressionRun, row: Row) -> None:
    """Record the row; metrics.csv, last.pt and (when the monitored metric improved) best.pt."""
    run.history.append(row)
    key = run.config.train.monitor
    value = row[key]
    improved = math.isnan(run.best_metric) or (value > run.best_metric if monitor_higher(key) else value < run.best_metric)
    if improved:
        run.best_metric, run.best_epoch = value, run.epoch
    write_metrics_csv(run.history, run.run_dir / "metrics.csv")
    save_state(run)
    if improved:
        save_best(run)
    run.tracker.log_epoch(run.step, row)
    run.stopped_early = early_stop_reason(key, run.epoch, run.best_epoch, run.config.train.early_stop) or run.stopped_early


def checkpoint_state(run: RegressionRun) -> dict[str, Any]:
    """The deepfit checkpoint dict: classes=[] (no classes), input_shape=[F], mean/std per feature,
    and the regression extras: the schema (how CSV rows become features) and target statistics."""
    data, scaling = run.data, run.data.scaling
    return {
        "kind": ckpt.KIND,
        "format_version": ckpt.FORMAT_VERSION,
        "config": run.config.to_dict(),
        "classes": [],
        "input_shape": [data.num_features],
        "mean": list(scaling.mean),
        "std": list(scaling.std),
        "target_mean": scaling.target_mean,
        "target_std": scaling.target_std,
        "schema": data.table.schema.to_dict(),
        "model": {k: v.detach().clone() for k, v in run.model.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "epoch": run.epoch,
        "step": run.step,
        "best_metric": run.best_metric,
        "best_epoch": run.best_epoch,
        "history": list(run.history),
        "rng": ckpt.rng_state(),
        "loader": run.batches.state_dict(),
    }


def save_state(run: RegressionRun) -> None:
    ckpt.save_checkpoint(checkpoint_state(run), run.run_dir / "checkpoints" / "last.pt")


def save_best(run: RegressionRun) -> None:
    """best.pt = the last.pt just written: a hard link renamed into place (the bytes are already
    on disk and fsynced; the next last.pt replaces its own name, not these bytes). Epochs here
    take milliseconds, so a second serialise-and-fsync per epoch doubled the run time."""
    folder = run.run_dir / "checkpoints"
    link = folder / f".best.pt.link{ckpt.TEMP_SUFFIX}"
    try:
        link.unlink(missing_ok=True)
        os.link(folder / "last.pt", link)
        os.replace(link, folder / "best.pt")
    except OSError:  # no hard links on this file system
        link.unlink(missing_ok=True)
        ckpt.save_checkpoint(checkpoint_state(run), folder / "best.pt")
    ckpt.fsync_dir(folder)


def restore(run: RegressionRun, state: dict[str, Any], path: Path) -> None:
    ckpt.load_model_state(run.model, state["model"], path)
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state["scheduler"] is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    run.epoch, run.step = int(state["epoch"]), int(state["step"])
    run.best_metric, run.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
    run.history = [dict(row) for row in state["history"]]
    run.batches.load_state_dict(state["loader"])
    ckpt.set_rng_state(state["rng"])


def finish(run: RegressionRun) -> RegressionResult:
    """Test metrics in the target's units (best weights with train.restore_best), and the figures."""
    if run.config.train.restore_best and run.best_epoch and run.best_epoch != run.epoch:
        best = run.run_dir / "checkpoints" / "best.pt"
        ckpt.load_model_state(run.model, ckpt.load_checkpoint(best)["model"], best)
    test = measure(run, run.data.test) if run.data.test is not None else {}
    from deepfit.regression.views import save_run_figures

    save_run_figures(run.model, run.data, run.history, run.run_dir / "plots")
    return RegressionResult(run.model, run.history, {f"test_{k}": v for k, v in test.items()}, run.run_dir, run.data, run.stopped_early)
