"""The live state of one training run (Run): what a checkpoint saves and what --resume restores,
exactly (weights and their average, optimizer, schedule, loss scale, loader position, RNGs)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepfit import checkpoint as ckpt
from deepfit import distributed
from deepfit.config import Config
from deepfit.cudagraphs import GraphedForward, GraphedStep
from deepfit.data import BatchLoader, DataBundle, StreamLoader
from deepfit.ema import WeightAverage
from deepfit.engine import FiniteGuard
from deepfit.history import LrPoint, Row
from deepfit.interrupts import StopFlag
from deepfit.lookahead import Lookahead, floating
from deepfit.optim import LossFn
from deepfit.tracking import LossTap, Trackers
from deepfit.trained import InitReport


@dataclass
class Run:
    """The live state of one training run: what a checkpoint saves and --resume restores."""

    config: Config
    data: DataBundle
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: BatchLoader | StreamLoader
    loss_fn: LossFn
    device: torch.device
    run_dir: Path
    epoch: int = 0  # completed epochs
    step: int = 0  # batches trained so far, over all epochs
    best_metric: float = math.nan
    best_epoch: int = 0
    history: list[Row] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    stopped_early: str | None = None
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling; its scale is part of the state
    signals: StopFlag = field(default_factory=StopFlag)  # SIGINT/SIGTERM seen during training
    votes: distributed.StopVotes = field(default_factory=distributed.StopVotes)  # several ranks: the stop vote in flight
    schedule_interval: str = "step"  # "step": the engine steps the scheduler; "epoch": train_epochs does
    init: InitReport | None = None
    guard: FiniteGuard | None = None  # the non-finite guard's device flag; read before every checkpoint
    graphs: GraphedForward | GraphedStep | None = None  # train.cuda_graphs on CUDA: the captured step, or the model's forward and backward
    ema: WeightAverage | None = None  # train.ema: the averaged weights, evaluated and saved as "model"
    lookahead: Lookahead | None = None  # train.lookahead: the slow weights the trained ones are pulled to
    tracker: Trackers = field(default_factory=lambda: Trackers({}))  # train.log: TensorBoard, MLflow
    loss_tap: LossTap | None = None  # the training loss, read every train.log_every steps for TensorBoard
    lrs: list[LrPoint] = field(default_factory=list)  # (fractional epoch, lr) after every batch -> lr.csv


def unwrap(model: nn.Module) -> nn.Module:
    return distributed.without_ddp(getattr(model, "_orig_mod", model))


def evaluated(run: Run) -> nn.Module:
    """The weights that are measured, saved as "model" and exported: the average with train.ema."""
    return run.ema.module if run.ema is not None else run.model


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}


def checkpoint_state(run: Run) -> dict[str, Any]:
    """Everything to rebuild the model and continue exactly where the run is now."""
    return {
        "kind": ckpt.KIND,
        "format_version": ckpt.FORMAT_VERSION,
        "config": run.config.to_dict(),
        "classes": list(run.data.classes),
        "input_shape": list(run.data.input_shape),
        "mean": list(run.data.mean),
        "std": list(run.data.std),
        "flip_ok": run.data.flip_ok,
        "model": weights_of(evaluated(run)),
        "ema": {"raw": weights_of(run.model), **run.ema.state_dict()} if run.ema is not None else None,  # the trained weights
        "lookahead": run.lookahead.state_dict() if run.lookahead is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "epoch": run.epoch,
        "step": run.step,
        "best_metric": run.best_metric,
        "best_epoch": run.best_epoch,
        "history": list(run.history),
        "lrs": [list(point) for point in run.lrs],
        "rng": ckpt.rng_state(),
        "loader": run.loader.state_dict(),
        "world_size": distributed.world().size,  # ranks that trained it; any number can resume it
    }


def save_state(run: Run, *, mid_epoch: bool) -> None:
    """last.pt always; with step checkpoints, also step-N.pt, rotated to the newest train.keep_last.
    Never after a non-finite step: the guard is read first (the save waits on the device anyway)."""
    if run.guard is not None:
        run.guard.check()
    if not distributed.is_main():  # every rank holds the same state; rank 0 writes it
        distributed.barrier()
        return
    state = checkpoint_state(run)
    folder = run.run_dir / "checkpoints"
    ckpt.save_checkpoint(state, folder / "last.pt")
    if mid_epoch and run.config.train.checkpoint_every:
        ckpt.save_checkpoint(state, folder / f"step-{run.step:08d}.pt")
        for old in sorted(folder.glob("step-*.pt"))[: -run.config.train.keep_last]:
            old.unlink(missing_ok=True)
    distributed.barrier()


def restore(run: Run, state: dict[str, Any], path: Path) -> None:
    """The run as `state` (read from `path`) left it: weights, optimizer, schedule, position and generators."""
    restore_weights(run, state, path)
    fresh_lrs = [group["lr"] for group in run.optimizer.param_groups]  # where the schedule built for this run starts
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state["scheduler"] is not None:
        if schedule_rebuilt(run, state):
            fast_forward(run, fresh_lrs, int(state["scheduler"].get("last_epoch", state["step"])))
        else:
            run.scheduler.load_state_dict(keep_span(state["scheduler"], run.scheduler.state_dict()))
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.epoch, run.step = int(state["epoch"]), int(state["step"])
    run.best_metric, run.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
    run.history = [dict(row) for row in state["history"]]
    run.lrs = [(float(epoch), float(lr)) for epoch, lr in state.get("lrs", [])]
    run.loader.load_state_dict(state["loader"])
    ckpt.set_rng_state(state["rng"])


def restore_weights(run: Run, state: dict[str, Any], path: Path) -> None:
    """The trained weights, and the average when both the checkpoint and this run have one
    (a run that turns train.ema on when resumed starts its average from the trained weights)."""
    averaged = state.get("ema")
    ckpt.load_model_state(unwrap(run.model), averaged["raw"] if averaged else state["model"], path)
    if run.ema is not None and averaged:
        ckpt.load_model_state(run.ema.module, state["model"], path)
        run.ema.load_state_dict(averaged)
    elif run.ema is not None:
        run.ema.module.load_state_dict(unwrap(run.model).state_dict())
    if run.lookahead is not None:  # turned on when resumed: the slow copy starts from the trained weights
        run.lookahead.load_state_dict(
            state.get("lookahead") or {"updates": int(state["step"]), "slow": [t.detach() for t in floating(unwrap(run.model))]}
        )


def schedule_rebuilt(run: Run, state: dict[str, Any]) -> bool:
    """Whether `--resume --epochs N` changed the length of a per-step schedule that still has
    steps to run: then the schedule is rebuilt for N epochs rather than stretched (a stretched
    one-cycle climbed back to its peak lr; a finished cosine stayed at its minimum)."""
    saved_epochs = int(state["config"].get("train", {}).get("epochs", run.config.train.epochs))
    per_step = run.schedule_interval == "step" and not isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    return per_step and saved_epochs != run.config.train.epochs and int(state["epoch"]) < run.config.train.epochs


def fast_forward(run: Run, fresh_lrs: list[float], steps: int) -> None:
    """The schedule built for this run's epochs, stepped to where the run stands: its lr is the
    new schedule's at that step (deterministic, so a second resume rebuilds it the same way)."""
    import warnings

    for group, lr in zip(run.optimizer.param_groups, fresh_lrs, strict=True):
        group["lr"] = lr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": replaying, not training
        for _ in range(steps):
            run.scheduler.step()


SPAN_KEYS = ("total_steps", "T_max", "step_size", "milestones", "_milestones")


def keep_span(saved: Any, fresh: Any) -> Any:
    """The saved schedule state, but with the length of the schedule built for this run's epochs,
    so `--resume --epochs N` can extend a run (identical when the epochs are unchanged)."""
    if isinstance(saved, dict) and isinstance(fresh, dict):
        return {k: fresh[k] if k in SPAN_KEYS and k in fresh else keep_span(v, fresh.get(k)) for k, v in saved.items()}
    if isinstance(saved, list) and isinstance(fresh, list) and len(saved) == len(fresh):
        return [keep_span(s, f) for s, f in zip(saved, fresh, strict=True)]
    return saved
