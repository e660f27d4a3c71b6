"""fit_node(config): full-batch transductive training of a node classifier. Every epoch is one
optimizer step on the training nodes through deepfit.engine (the whole graph is one batch: the
batch's x is the node indices, and NodeSelector runs the model on the graph and picks those rows),
then one forward pass scores the validation nodes. The run folder is the image task's."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from deepfit import checkpoint as ckpt
from deepfit.config import Config, parse_duration, save_config, validate
from deepfit.engine import StepOptions, evaluate, train_one_epoch
from deepfit.errors import ConfigError, StopRequested
from deepfit.graph.models import NODE_MODELS, decay_groups
from deepfit.graph.sources import Graph, build_graph
from deepfit.graph.trained import build_model_for, graph_state
from deepfit.history import Row, early_stop_reason, write_metrics_csv
from deepfit.interrupts import StopFlag
from deepfit.optim import LossFn, ScheduleSpan, build_loss, build_optimizer, schedule_from_config, step_epoch_schedule
from deepfit.runtime import seed_everything, select_device, set_deterministic, set_threads
from deepfit.stopping import after_training, stoppable
from deepfit.tracking import Trackers, final_record, require_trackers, run_info, start_trackers

EpochFn = Callable[[Row], None]
NODE_METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")  # what each epoch's row records
SPARSE_BELOW = 0.1  # features with fewer non-zeros than this share are multiplied as sparse (Cora: 1.3%)


class NodeSelector(nn.Module):
    """Adapts a node model to the engine's (x, y) batches: forward(node indices) runs the model on
    the whole graph and returns those nodes' logits. The graph is a non-persistent buffer, so it
    moves with .to(device) and stays out of the state dict."""

    def __init__(self, model: nn.Module, features: torch.Tensor, edge_index: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("features", features, persistent=False)
        self.register_buffer("edge_index", edge_index, persistent=False)

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        return self.model(self.features, self.edge_index)[nodes]


@dataclass
class NodeRun:
    """The live state of one node run: what a checkpoint saves and --resume restores."""

    config: Config
    graph: Graph
    model: nn.Module
    selector: NodeSelector
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: LossFn
    run_dir: Path
    epoch: int = 0
    best_metric: float = math.nan
    best_epoch: int = 0
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[Row] = field(default_factory=list)
    stopped_early: str | None = None
    signals: StopFlag = field(default_factory=StopFlag)
    train_seconds: float = 0.0  # wall time of the epochs (training and validation), this process
    tracker: Trackers = field(default_factory=lambda: Trackers({}))  # train.log's TensorBoard / MLflow


@dataclass
class NodeFitResult:
    model: nn.Module  # trained (best weights when train.restore_best), eval mode
    graph: Graph
    history: list[Row]
    metrics: dict[str, float]  # test_acc, test_loss (absent without test nodes)
    run_dir: Path
    stopped_early: str | None = None
    train_seconds: float = 0.0


def fit_node(
    config: Config, *, resume: str | Path | None = None, on_epoch: EpochFn | None = None, on_start: Callable[[Graph], None] | None = None
) -> NodeFitResult:
    """Train config.model.name on the graph config.data names; write the run folder. `on_start`
    sees the graph once it is loaded, before the first epoch."""
    validate(config)
    NODE_MODELS.get(config.model.name)  # an unknown model fails before any data is read
    if config.train.monitor not in NODE_METRICS:
        raise ConfigError(f"train.monitor {config.train.monitor!r} is not a metric of a node run; valid: {', '.join(NODE_METRICS)}")
    set_threads(config.train.threads)
    set_deterministic(config.train.deterministic)  # before any CUDA work, as fit does
    seed_everything(config.train.seed)
    require_trackers(config.train.log)  # a missing package: one line, before any run folder exists
    run = prepare_node_run(config, resume)
    info = run_info(run.config, run.run_dir, step=run.epoch, resumed=resume is not None, history=run.history)
    with ckpt.holding(run.run_dir):  # the run folder is this process's until training returns or raises
        if on_start is not None:
            on_start(run.graph)
        with start_trackers(run.config.train.log, info) as run.tracker:  # step = epoch: one optimizer step each
            with stoppable(run.run_dir, lambda: save_node_state(run), finished=lambda: run.stopped_early == "time limit") as run.signals:
                train_node_epochs(run, on_epoch)
                save_node_state(run)  # the final checkpoints, written with a Ctrl-C held off as a stop's are
            with after_training(run.run_dir):
                result = finish_node(run)
                run.tracker.log_final(run.epoch, final_record(run.config, run.run_dir, result.metrics, None))
    return result


def graph_of(config: Config) -> Graph:
    """The graph config.data names, split by config.train.seed, as a node run trains on it."""
    d = config.data
    return build_graph(d.name, data_dir=d.dir, cache_dir=d.cache_dir, nodes=d.nodes, val_fraction=d.val_fraction,
                       test_fraction=d.node_test_fraction, seed=config.train.seed)  # fmt: skip


def prepare_node_run(config: Config, resume: str | Path | None) -> NodeRun:
    """Everything that can fail on bad input first; the run folder last."""
    saved = ckpt.load_resumed(Path(resume), config) if resume is not None else None
    graph = graph_of(config)
    device = select_device(config.train.device)
    model = build_model_for(config, graph, cached=True).to(device)  # one fixed graph: normalise its adjacency once
    selector = NodeSelector(model, model_features(graph.features), graph.edge_index).to(device)
    o = config.optim
    optimizer = build_optimizer(o.name, decay_groups(model, o.weight_decay), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay, betas=(o.betas[0], o.betas[1]), device=device)  # fmt: skip
    scheduler = make_node_scheduler(config, optimizer)
    loss_fn = build_loss(config.loss.name, label_smoothing=config.loss.label_smoothing)
    run_dir = Path(resume) if resume is not None else ckpt.new_run_dir(config.train.out, data=config.data.name, model=config.model.name)
    run = NodeRun(config, graph, model, selector, optimizer, scheduler, loss_fn, run_dir)
    with ckpt.claiming(run_dir):
        if saved is not None:
            ckpt.remove_stale_temps(run_dir / "checkpoints")
            restore_node(run, saved, run_dir / "checkpoints")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    return run


def model_features(features: torch.Tensor) -> torch.Tensor:
    """Sparse COO when mostly zeros (Cora's bag of words: 1.3% non-zero), else dense."""
    density = float((features != 0).float().mean()) if features.numel() else 1.0
    return features.to_sparse().coalesce() if density < SPARSE_BELOW else features


def make_node_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> Any:
    """config.sched with one optimizer step per epoch (the whole graph is one batch)."""
    s = config.sched
    mode: Literal["min", "max"] = "min" if config.train.monitor.endswith("loss") else "max"
    return schedule_from_config(s, optimizer, span=ScheduleSpan(1, config.train.epochs), mode=mode)


def train_node_epochs(run: NodeRun, on_epoch: EpochFn | None) -> None:
    cfg = run.config.train
    plateau = isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    options = StepOptions(scheduler=None if plateau else run.scheduler, clip_grad=cfg.clip_grad)
    deadline = time.monotonic() + parse_duration(cfg.time_limit) if cfg.time_limit else math.inf
    train_batch = batch_of(run, "train")
    val_batch = batch_of(run, "val")
    while run.epoch < cfg.epochs and run.stopped_early is None:
        run.signals.check()
        started = time.monotonic()
        train = train_one_epoch(run.selector, [train_batch], run.optimizer, run.loss_fn, options=options)
        run.epoch += 1
        row: Row = {"epoch": float(run.epoch), "train_loss": train["loss"], "train_acc": train["acc"]}
        if len(val_batch[1]):
            val = evaluate(run.selector, [val_batch], run.loss_fn)
            row.update({"val_loss": val["loss"], "val_acc": val["acc"]})
        row["lr"] = float(run.optimizer.param_groups[0]["lr"])
        row["seconds"] = time.monotonic() - started
        run.train_seconds += row["seconds"]
        if plateau:
            step_epoch_schedule(run.scheduler, row.get(monitored(run), math.nan))
        end_node_epoch(run, row)
        if on_epoch is not None:
            on_epoch(row)
        if time.monotonic() > deadline and run.epoch < cfg.epochs:
            run.stopped_early = "time limit"
            raise StopRequested(f"time limit {cfg.time_limit} reached")
    if run.stopped_early is None:  # a signal during the last epoch's step, evaluation and save still stops the run
        run.signals.check()


def batch_of(run: NodeRun, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(node indices, their labels) of a split, on the model's device."""
    nodes = run.graph.split(split)
    device = next(run.model.parameters()).device
    return nodes.to(device), run.graph.labels[nodes].to(device)


def monitored(run: NodeRun) -> str:
    key = run.config.train.monitor
    if key.startswith("val_") and not bool(run.graph.val_mask.any()):
        # karate has no validation nodes; the training accuracy reaches 100% in a few epochs,
        # so "best" would freeze there: the training loss keeps falling instead
        key = "train_loss"
    return key


def end_node_epoch(run: NodeRun, row: Row) -> None:
    """Record the row; keep the best weights in memory; periodic checkpoints; early stopping.
    An epoch takes milliseconds, so last.pt and best.pt are written at the end, on a stop (signal,
    time limit) and every train.checkpoint_every epochs, not after every epoch."""
    run.history.append(row)
    run.tracker.log_epoch(run.epoch, row)
    key = monitored(run)
    if key not in row:
        valid = ", ".join(k for k in row if k not in ("epoch", "lr", "seconds"))
        raise ConfigError(f"train.monitor {run.config.train.monitor!r} is not a recorded metric of a node run; valid: {valid}")
    value, lower = row[key], key.endswith("loss")
    if math.isnan(run.best_metric) or (value < run.best_metric if lower else value > run.best_metric):
        run.best_metric, run.best_epoch = value, run.epoch
        run.best_weights = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    every = run.config.train.checkpoint_every
    if every and run.epoch % every == 0:
        save_node_state(run)
    run.stopped_early = early_stop_reason(key, run.epoch, run.best_epoch, run.config.train.early_stop) or run.stopped_early


def node_checkpoint(run: NodeRun, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The image task's checkpoint keys (REQUIRED_KEYS hold: input_shape is [F], no mean/std)
    plus the graph itself."""
    return {
        "kind": ckpt.KIND,
        "format_version": ckpt.FORMAT_VERSION,
        "config": run.config.to_dict(),
        "classes": list(run.graph.classes),
        "input_shape": [run.graph.num_features],
        "mean": [],
        "std": [],
        "model": weights,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "epoch": run.epoch,
        "step": run.epoch,  # one optimizer step per epoch
        "best_metric": run.best_metric,
        "best_epoch": run.best_epoch,
        "history": list(run.history),
        "rng": ckpt.rng_state(),
        "graph": graph_state(run.graph),
    }


def save_node_state(run: NodeRun) -> None:
    """metrics.csv, last.pt (the current weights) and best.pt (the best so far)."""
    if run.history:
        write_metrics_csv(run.history, run.run_dir / "metrics.csv")
    current = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    folder = run.run_dir / "checkpoints"
    ckpt.save_checkpoint(node_checkpoint(run, current), folder / "last.pt")
    if run.best_weights:
        ckpt.save_checkpoint(node_checkpoint(run, run.best_weights), folder / "best.pt")


def restore_node(run: NodeRun, state: dict[str, Any], folder: Path) -> None:
    ckpt.load_model_state(run.model, state["model"], folder / "last.pt")
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state["scheduler"] is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    run.epoch = int(state["epoch"])
    run.best_metric, run.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
    run.history = [dict(row) for row in state["history"]]
    if (folder / "best.pt").is_file():
        run.best_weights = dict(ckpt.load_checkpoint(folder / "best.pt")["model"])
    ckpt.set_rng_state(state["rng"])


def finish_node(run: NodeRun) -> NodeFitResult:
    """Restore the best weights if asked, score the test nodes once, draw."""
    if run.config.train.restore_best and run.best_weights:
        run.model.load_state_dict(run.best_weights)
    metrics: dict[str, float] = {}
    test_batch = batch_of(run, "test")
    if len(test_batch[1]):
        metrics = {f"test_{k}": v for k, v in evaluate(run.selector, [test_batch], run.loss_fn).items()}
    from deepfit.graph.figures import save_run_figures

    run.model.eval()
    save_run_figures(run.run_dir, run.history, run.model, run.graph)
    return NodeFitResult(run.model, run.graph, run.history, metrics, run.run_dir, run.stopped_early, run.train_seconds)


# Kipf & Welling's Cora settings: the base a node run's YAML and flags apply over (the image
# defaults, Adam 3e-3 with one-cycle over 20 epochs and an mlp of 200 units, do not fit).
NODE_DEFAULTS: dict[str, Any] = {
    "data.name": "karate",  # `deepfit train --task node` alone trains the embedded graph, as the other tasks do theirs
    "model.name": "gcn",
    "model.hidden": [16],
    "model.dropout": 0.5,
    "optim.name": "adam",
    "optim.lr": 0.01,
    "optim.weight_decay": 5e-4,
    "sched.name": "none",
    "train.epochs": 200,
    "train.monitor": "val_acc",
    "train.restore_best": True,
    # A full-batch epoch is a few small sparse products: on the shared 2-core machine a GCNConv
    # forward + backward on Cora took 0.10 s with one thread and 1.16 s with two.
    "train.threads": 1,
}


def node_defaults() -> Config:
    """A Config holding the node task's defaults."""
    from deepfit.config import set_value

    config = Config()
    config.data.task = "node"
    for key, value in NODE_DEFAULTS.items():
        set_value(config, key, value)
    return config
