"""fit(config) -> FitResult: build data and model, train epoch by epoch, checkpoint, evaluate.
Reads like a table of contents: the parts it builds are in fitparts.py, the run's state that
checkpoints save and --resume restores in runstate.py, the loop itself in engine.py."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from deepfit import checkpoint as ckpt
from deepfit import distributed
from deepfit.config import Config, config_from_overrides, infer_task, parse_duration, save_config, validate
from deepfit.cudagraphs import GraphedForward, GraphedStep
from deepfit.data import DataBundle, anchor_paths, build_data, build_loader, refuse_run_in_folder, require_classes
from deepfit.data.balance import balanced_sample_weights
from deepfit.data.mix import Mix, MixedBatches
from deepfit.ema import WeightAverage
from deepfit.engine import Fault, FiniteGuard, StepOptions, Totals, predict_logits, train_one_epoch
from deepfit.errors import ConfigError, StopRequested
from deepfit.fitparts import (
    SKIPPED_FILE,
    augment_for,
    build_network,
    build_scaler,
    choose_schedule,
    class_weights,
    cuda_graphs,
    make_optimizer,
    require_callbacks,
    require_logits,
    require_model_parameters,
    require_saved_classes,
    require_training_memory,
    save_skipped,
    warn_unsafe_tta,
)
from deepfit.history import LR_FILE, Row, early_stop_reason, write_lr_csv, write_metrics_csv
from deepfit.interrupts import NothingTrained, take_early_interrupt
from deepfit.lookahead import Lookahead
from deepfit.metrics import classification_metrics
from deepfit.models import class_path_of
from deepfit.optim import build_loss, step_epoch_schedule
from deepfit.runstate import Run, checkpoint_state, evaluated, restore, save_state, unwrap
from deepfit.runtime import (
    autocast_dtype,
    keep_freed_memory_on,
    seed_everything,
    select_device,
    set_cudnn_benchmark,
    set_deterministic,
    set_threads,
)
from deepfit.scorecard import draw_test_figures
from deepfit.stopping import after_training, stoppable
from deepfit.tracking import LossTap, Trackers, final_record, require_trackers, run_info, start_trackers
from deepfit.trained import InitReport, on_train_epoch_start, place_model

ProgressFn = Callable[[Iterable[Any], str, int], Iterable[Any]]  # (batches, description, total) -> batches
EpochFn = Callable[[Row], None]


@dataclass
class FitResult:
    model: nn.Module  # the trained model (best weights when train.restore_best)
    history: list[Row]  # one row per epoch, as in metrics.csv
    metrics: dict[str, float]  # final test metrics (test_acc, test_loss, ...), empty without a test split
    run_dir: Path
    data: DataBundle
    stopped_early: str | None = None  # why training ended before train.epochs, if it did
    init: InitReport | None = None  # what --init-from copied and which tensors did not match
    weights: str = "last.pt"  # the checkpoint whose weights `model` and `metrics` are: best.pt unless restore_best is off
    weights_epoch: int = 0  # the epoch those weights finished


def fit(
    config: Config | None = None,
    *,
    model: nn.Module | str | None = None,
    data: DataBundle | Dataset[Any] | str | None = None,
    resume: str | Path | None = None,
    progress: ProgressFn | None = None,
    on_epoch: EpochFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    on_start: Callable[[DataBundle], None] | None = None,
    **overrides: Any,
) -> FitResult:
    """Train `model` (default: the registered config.model.name) on `data` (default: config.data):
    a DataBundle, or any torch Dataset of (image, label) pairs (PIL images, CxHxW tensors or HxWxC arrays).
    A string names a registered model or a data source; keyword `overrides` (epochs=2,
    optim={"lr": 3e-3}, ...) apply over `config` as the CLI's flags do (config_from_overrides).
    `optimizer`: any torch optimizer over `model`'s parameters (default: config.optim).
    `scheduler`: anything deepfit.optim.Schedule takes (a scheduler object, class/partial, or a
    lambda epoch -> lr factor), stepped after each epoch unless wrapped in
    Schedule(..., interval="step"); default: config.sched, stepped after each optimizer step.
    `on_start` sees the data once it is built, before the first epoch."""
    data = os.fspath(data) if isinstance(data, os.PathLike) else data  # a Path names a source as its text does
    require_callbacks(progress=progress, on_epoch=on_epoch, on_start=on_start)
    named = {key: value for key, value in (("model", model), ("data", data)) if isinstance(value, (str, dict))}
    config = config_from_overrides(config, **named, **overrides) if named or overrides or config is None else config
    model = None if isinstance(model, (str, dict)) else model
    data = None if isinstance(data, (str, dict)) else data
    require_image_config(config)
    validate(config)
    if data is not None and not isinstance(data, DataBundle):  # the saved config names what the run trained on
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, name=class_path_of(data)))  # module:Class
    if model is not None and not type(model).__module__.startswith("deepfit."):  # config.yaml and the checkpoint say whose model
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, name="custom", class_path=class_path_of(model)))
    anchor_paths(config.data)
    if resume is None and data is None:
        refuse_run_in_folder(config.data, Path(config.train.out or "runs"))
    set_threads(config.train.threads)
    set_deterministic(config.train.deterministic)  # before any CUDA work: cuBLAS reads its setting once
    seed_everything(config.train.seed)
    set_cudnn_benchmark(config.train.cudnn_benchmark)
    require_trackers(config.train.log)  # a missing package: one line, before any run folder exists
    try:
        run = prepare_run(config, model, data, resume, optimizer=optimizer, scheduler=scheduler)
    except KeyboardInterrupt:  # Ctrl-C while data and model are built, before the handlers below
        raise NothingTrained() from None
    with ckpt.holding(run.run_dir):  # the run folder is this process's until fit returns or raises
        if take_early_interrupt() is not None:  # a start-up Ctrl-C whose KeyboardInterrupt something swallowed
            raise NothingTrained()
        if on_start is not None:
            on_start(run.data)
        with open_trackers(run, resumed=resume is not None):
            with stoppable(
                run.run_dir, lambda: save_state(run, mid_epoch=True), finished=lambda: run.stopped_early == "time limit"
            ) as run.signals:
                train_epochs(run, progress, on_epoch)
            with after_training(run.run_dir):
                return finish(run)


OTHER_TASKS = {  # what trains the tasks deepfit.fit does not, with their own defaults
    "regression": "from deepfit.regression import default_config, fit_regression; fit_regression(config) (defaults: default_config())",
    "node": "from deepfit.graph import fit_node, node_defaults; fit_node(config) (defaults: node_defaults())",
}


def require_image_config(config: Config) -> None:
    """deepfit.fit trains image classifiers: a config whose task is another (data.task, or the
    one --data, --target or --data.nodes implies, as on the command line) is refused in one line
    naming the function that trains it, rather than trained as images (a node config trained
    the digits and saved a checkpoint that said `node`)."""
    task = infer_task(config.data)
    if task != "image":
        raise ConfigError(f"deepfit.fit trains image classifiers; this config is a {task} run: {OTHER_TASKS[task]}")


def open_trackers(run: Run, *, resumed: bool) -> Trackers:
    """train.log's trackers, continuing the run's own logs when resumed."""
    info = run_info(run.config, run.run_dir, step=run.step, resumed=resumed, history=run.history)
    run.tracker = start_trackers(run.config.train.log, info)
    run.loss_tap = LossTap(run.loss_fn) if run.tracker.wants_steps else None
    return run.tracker


def prepare_run(
    config: Config,
    model: nn.Module | None,
    data: DataBundle | Dataset[Any] | None,
    resume: str | Path | None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> Run:
    """Build everything that can fail on bad input first; create the run folder last."""
    if optimizer is not None and model is None:
        raise ConfigError("fit(optimizer=...) needs the model it optimizes: pass model= too")
    saved = ckpt.load_resumed(Path(resume), config) if resume is not None else None
    device = distributed.rank_device(select_device(config.train.device))  # cuda:LOCAL_RANK under torchrun
    keep_freed_memory_on(device)  # CPU: reuse each step's freed activations instead of page-faulting them back in
    bundle = data if isinstance(data, DataBundle) else build_data(config.data, seed=config.train.seed, dataset=data)
    require_classes(bundle)
    require_saved_classes(saved, bundle, resume)
    if model is None:  # a registered model: built on the meta device first when the images are large
        require_training_memory(config, bundle, device)
    net, init = build_network(config, bundle, model, fresh=resume is None)
    net, channels_last = place_model(net, config.model.channels_last, device)
    if model is not None or config.model.class_path:
        require_logits(net, bundle, device, channels_last=channels_last)
    loader = build_loader(
        bundle.train, batch_size=config.data.batch_size, mean=bundle.mean, std=bundle.std, device=device,
        shuffle=True, augment=augment_for(config.data.augment, bundle), seed=config.train.seed, channels_last=channels_last,
        crop_pad=config.data.crop_pad, pad_mode=config.data.pad_mode, flip=config.data.flip, num_workers=config.data.num_workers,
        skip_bad=config.data.skip_bad, drop_last=config.data.drop_last,
    )  # fmt: skip
    warn_unsafe_tta(config.train.tta, bundle)
    if optimizer is not None:
        require_model_parameters(optimizer, net)
    optimizer = optimizer if optimizer is not None else make_optimizer(config, net, device)
    schedule, interval = choose_schedule(config, optimizer, scheduler, loader.batches_per_epoch)
    if config.data.sampler == "balanced":
        loader.sample_weights = balanced_sample_weights(bundle.train.labels, bundle.num_classes)
    loss_fn = build_loss(config.loss.name, label_smoothing=config.loss.label_smoothing, weight=class_weights(config, bundle, device))
    graphs = cuda_graphs(config, net, device, ranks=distributed.env_world().size, optimizer=optimizer, scheduler=schedule)
    distributed.start(device)  # joined after bad input had its chance to stop every rank alike
    distributed.shard_loader(loader)
    net = distributed.wrap_model(net, device, loader, sync_bn=config.train.sync_bn)
    net = torch.compile(net) if config.model.compile else net  # type: ignore[assignment]
    main = distributed.is_main()
    run_dir = (
        Path(resume)
        if resume is not None
        else distributed.agree(
            ckpt.new_run_dir(config.train.out, data=config.data.name.rpartition(":")[2], model=config.model.name, make=main)
        )
    )
    run = Run(config, bundle, net, optimizer, schedule, loader, loss_fn, device, run_dir, schedule_interval=interval, init=init)
    run.scaler = build_scaler(config.train.precision, device)
    run.graphs = graphs
    run.ema = WeightAverage(unwrap(net), config.train.ema) if config.train.ema else None
    if config.train.lookahead:
        run.lookahead = Lookahead(unwrap(net), config.train.lookahead, total_steps=config.train.epochs * loader.batches_per_epoch)
    with ckpt.claiming(run_dir, claim=main):  # rank 0 writes the run
        if saved is not None:
            ckpt.remove_stale_temps(run_dir / "checkpoints")  # left by a killed save
            restore(run, saved, run_dir / "checkpoints" / "last.pt")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        if main:
            save_config(config, run_dir / "config.yaml")
        if bundle.skipped and main:
            save_skipped(bundle.skipped, run_dir / SKIPPED_FILE)
    return run


def train_epochs(run: Run, progress: ProgressFn | None, on_epoch: EpochFn | None) -> None:
    cfg = run.config.train
    run.guard = FiniteGuard(run.device, agree=agreed_fault)
    per_epoch = run.schedule_interval == "epoch" or isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    steps = run.graphs if isinstance(run.graphs, GraphedStep) else None
    options = StepOptions(
        scheduler=None if per_epoch else run.scheduler, autocast_dtype=autocast_dtype(cfg.precision, run.device),
        clip_grad=cfg.clip_grad, accumulate=cfg.accumulate, scaler=run.scaler, guard=run.guard,
        graphs=run.graphs if isinstance(run.graphs, GraphedForward) else None, steps=steps,
        totals=Totals(run.device) if steps is not None else None,  # the captured step adds into the same tensors every epoch
    )  # fmt: skip
    deadline = run.started + parse_duration(cfg.time_limit) if cfg.time_limit else math.inf
    data = run.config.data
    mix = Mix(data.mix, data.mix_alpha, run.data.num_classes) if data.mix != "none" else None
    while run.epoch < cfg.epochs and run.stopped_early is None:
        check_stop(run)
        started = time.monotonic()
        batches = progress(run.loader, f"epoch {run.epoch + 1}/{cfg.epochs}", len(run.loader)) if progress else run.loader
        if mix is not None:
            batches = MixedBatches(batches, mix, run.loader.generator)
        loss_fn = run.loss_tap or run.loss_fn
        on_train_epoch_start(unwrap(run.model), run.epoch)
        train = train_one_epoch(run.model, batches, run.optimizer, loss_fn, options=options, on_step=lambda: after_step(run, deadline))
        run.epoch += 1
        row = epoch_row(run, train, time.monotonic() - started)
        if per_epoch and run.scheduler is not None:  # after the epoch's row, before last.pt saves its state
            step_epoch_schedule(run.scheduler, row.get(monitored_key(run), math.nan))
        end_epoch(run, row)
        run.tracker.log_epoch(run.step, row)
        if on_epoch is not None:
            on_epoch(row)
    if run.stopped_early is None:  # a signal during the last epoch's validation and save still stops the run
        check_stop(run)
    else:  # stopped early by its metric: no vote is left in flight
        run.votes.collect()


def agreed_fault(fault: Fault | None) -> Fault | None:
    """The fault every rank stops on: the earliest that any rank's guard saw, named with its rank."""
    if not distributed.active():
        return fault
    found = distributed.earliest(fault)
    if found is None:
        return None
    first, rank = found
    return first._replace(what=f"{first.what} on rank {rank}")


def after_step(run: Run, deadline: float) -> None:
    """Per-batch bookkeeping: step checkpoints and the wall-time budget."""
    run.step += 1
    run.lrs.append((run.epoch + run.loader.position / run.loader.batches_per_epoch, float(run.optimizer.param_groups[0]["lr"])))
    every = run.config.train.checkpoint_every
    aligned = run.loader.position % run.config.train.accumulate == 0
    if aligned or run.loader.position == run.loader.batches_per_epoch:  # an optimizer step was taken
        if run.lookahead is not None:
            run.lookahead.update(unwrap(run.model), run.step)
        if run.ema is not None:
            run.ema.update(unwrap(run.model))
    if run.loss_tap is not None and run.loss_tap.last is not None and run.step % run.config.train.log_every == 0:
        run.tracker.log_step(run.step, {"train_loss_step": float(run.loss_tap.last)})
    if every and run.step % every == 0 and aligned and run.loader.position < run.loader.batches_per_epoch:
        save_state(run, mid_epoch=True)
    if aligned and check_stop(run, late=time.monotonic() > deadline, each_step=True):  # after the step checkpoint: a signal costs no step
        run.stopped_early = "time limit"
        raise StopRequested(f"time limit {run.config.train.time_limit} reached")


def check_stop(run: Run, *, late: bool = False, each_step: bool = False) -> bool:
    """Raise SignalStop if a signal arrived (on any rank); whether any rank is past the time limit.
    Ranks decide together, so all stop after the same step: after each step by a vote that is
    answered one step later (StopVotes: no wait), at epoch boundaries at once."""
    vote = run.votes.after_step if each_step else run.votes.at_once
    agreed, late = vote(run.signals.signum, late)
    if agreed is not None:  # a signal that lands while the ranks agree stays in the flag for the next check
        run.signals.signum = agreed  # every rank stops with the same one
        run.signals.check()
    return late


def epoch_row(run: Run, train: dict[str, float], seconds: float) -> Row:
    train = distributed.mean_over_ranks(train, run.loader.rows_this_epoch)  # each rank saw its shards
    row: Row = {"epoch": float(run.epoch), "train_loss": train["loss"], "train_acc": train["acc"]}
    if run.data.val is not None:
        for key, value in measure(run, run.data.val).items():
            row[f"val_{key}"] = value
    row["lr"] = float(run.optimizer.param_groups[0]["lr"])
    row["seconds"] = seconds
    return row


def measure(run: Run, split: Any, *, tta: str = "none") -> dict[str, float]:
    """loss, acc, top-k and macro F1 of the current model on an ImageSet (tta: averaged over engine.tta_views)."""
    batches = build_loader(
        distributed.shard_split(split),  # each rank predicts its part; all ranks then hold every row
        batch_size=run.config.data.eval_batch_size,
        mean=run.data.mean,
        std=run.data.std,
        device=run.device,
        channels_last=run.loader.channels_last,
        num_workers=run.config.data.num_workers,
        skip_bad=run.config.data.skip_bad,
    )
    model = unwrap(evaluated(run)) if distributed.active() else evaluated(run)  # DDP's forward would sync buffers per batch
    logits, labels = predict_logits(model, batches, autocast_dtype=autocast_dtype(run.config.train.precision, run.device), tta=tta)
    logits, labels = distributed.gather_rows(logits, labels)
    metrics = classification_metrics(logits, labels, topk=run.config.train.topk)
    metrics["loss"] = float(run.loss_fn(logits, labels))
    return metrics


def monitored_key(run: Run) -> str:
    key = run.config.train.monitor
    if key.startswith("val_") and run.data.val is None:
        key = "train_" + key[4:]
    return key


def end_epoch(run: Run, row: Row) -> None:
    """Record the row, keep the best weights, write metrics.csv and last.pt, check early stopping."""
    run.history.append(row)
    key = monitored_key(run)
    if key not in row:
        valid = ", ".join(k for k in row if k not in ("epoch", "lr", "seconds"))
        raise ConfigError(f"train.monitor {run.config.train.monitor!r} is not a recorded metric; valid: {valid}")
    value, lower = row[key], key.endswith("loss")
    improved = math.isnan(run.best_metric) or (value < run.best_metric if lower else value > run.best_metric)
    if improved:
        run.best_metric, run.best_epoch = value, run.epoch
    if distributed.is_main():
        write_metrics_csv(run.history, run.run_dir / "metrics.csv")
        write_lr_csv(run.lrs, run.run_dir / LR_FILE)
    save_state(run, mid_epoch=False)
    if improved and distributed.is_main():
        ckpt.save_checkpoint(checkpoint_state(run), run.run_dir / "checkpoints" / "best.pt")
    run.stopped_early = early_stop_reason(key, run.epoch, run.best_epoch, run.config.train.early_stop) or run.stopped_early


def finish(run: Run) -> FitResult:
    """Restore the best weights (the run stands for best.pt, as evaluate, predict and export read
    it), measure the test split once with them, draw the curves."""
    weights, epoch = "last.pt", run.epoch
    best_path = run.run_dir / "checkpoints" / "best.pt"
    if run.config.train.restore_best and run.best_epoch and (run.best_epoch == run.epoch or best_path.is_file()):
        weights, epoch = "best.pt", run.best_epoch  # a run folder without best.pt (copied last.pt alone) keeps its weights
        if run.best_epoch != run.epoch:
            best = ckpt.load_checkpoint(best_path)
            ckpt.load_model_state(unwrap(evaluated(run)), best["model"], best_path)
    test = measure(run, run.data.test, tta=run.config.train.tta) if run.data.test is not None else {}
    metrics = {f"test_{k}": v for k, v in test.items()}
    if run.history and distributed.is_main():
        from deepfit.plots import plot_curves, save_figure  # matplotlib loads when a run ends, not on import

        save_figure(plot_curves(run.history, lrs=run.lrs), run.run_dir / "plots" / "curves.png")
    figures = functools.partial(draw_test_figures, evaluated(run), run.data, device=run.device, batch_size=run.config.data.eval_batch_size)
    run.tracker.log_final(run.step, final_record(run.config, run.run_dir, metrics, figures))
    return FitResult(unwrap(evaluated(run)), run.history, metrics, run.run_dir, run.data, run.stopped_early, run.init, weights, epoch)
