"""Experiment trackers beside metrics.csv (train.log): TensorBoard event files in RUN/tb/ and an
MLflow run. metrics.csv stays the source of truth: a tracker that fails (an unreachable server,
a full disk) is a warning and is dropped, and training goes on. tensorboard and mlflow are the
`track` extra, imported only when asked for, so `deepfit` starts no slower without them.

Resumed runs continue the same log: TensorBoard's writer purges the events logged after the
checkpoint the run resumes from (purge_step), and the MLflow run id is kept in RUN/mlflow.json."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

from deepfit.config import Config
from deepfit.optional import MissingDependencyError, import_optional

TRACKERS = ("tensorboard", "mlflow")
MLFLOW_FILE = "mlflow.json"  # in the run folder: {"run_id", "tracking_uri"}, so --resume continues the same MLflow run
EXPERIMENT = "deepfit"  # the MLflow experiment every deepfit run is logged under
Values = Mapping[str, float]
FigureFn = Callable[[], dict[str, Any]]  # -> {tag: matplotlib Figure}, drawn only when a tracker takes images


class Logger(Protocol):
    """What fit() calls; `step` is the global step (batches trained), the x axis of every value."""

    def log_step(self, step: int, values: Values) -> None: ...

    def log_epoch(self, step: int, row: Values) -> None: ...

    def log_final(self, step: int, final: Final) -> None: ...

    def close(self, *, finished: bool) -> None: ...


@dataclass
class Final:
    """The end of a run: test metrics, hyper-parameters, files to keep and figures to draw."""

    metrics: dict[str, float]
    params: dict[str, Any]  # the resolved config, flattened: {"optim.lr": 0.003, ...}
    files: list[Path] = field(default_factory=list)
    figures: FigureFn | None = None


@dataclass
class RunInfo:
    """What a tracker needs to open: the run folder, the config as flat params and tags."""

    run_dir: Path
    params: dict[str, Any]
    tags: dict[str, str]
    step: int  # the global step the run starts (or resumes) from
    resumed: bool
    history: list[dict[str, float]]  # rows already trained (resumed runs)
    mlflow_uri: str | None = None


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.003}} -> {"optim.lr": 0.003}; lists become "a,b" and None "none"."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(v) for v in value)
        else:
            flat[name] = "none" if value is None else value
    return flat


def run_info(config: Config, run_dir: Path, *, step: int, resumed: bool, history: list[dict[str, float]]) -> RunInfo:
    tags = {"data": config.data.name, "model": config.model.name, "task": config.data.task}
    return RunInfo(run_dir, flatten(config.to_dict()), tags, step, resumed, history, config.train.mlflow_uri)


def final_record(config: Config, run_dir: Path, metrics: dict[str, float], figures: FigureFn | None) -> Final:
    """For the trackers: test metrics, the config, the run's figures and report, and best.pt."""
    names = [*sorted((run_dir / "plots").glob("*.png")), run_dir / "report.html", run_dir / "checkpoints" / "best.pt"]
    return Final(metrics, flatten(config.to_dict()), [path for path in names if path.is_file()], figures)


def finite(values: Values, *, skip: Iterable[str] = ()) -> dict[str, float]:
    """The values worth logging: numbers that are not NaN (an absent metric is NaN in a row)."""
    return {k: float(v) for k, v in values.items() if k not in skip and not math.isnan(float(v))}


class LossTap:
    """Wraps the training loss and keeps the last batch's loss on the device, so the train loss
    can be read every log_every steps without a host sync on the others (engine.py reads none)."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.loss_fn = loss_fn
        self.last: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(logits, targets)
        self.last = loss.detach()
        return loss


class TensorBoardLogger:
    """SummaryWriter on RUN/tb/: scalars at the global step, hparams, images at the end."""

    def __init__(self, info: RunInfo) -> None:
        board = import_optional("torch.utils.tensorboard", extra="track", purpose="--log tensorboard")
        # Resumed: events after the checkpoint's step were logged by the killed process and will be
        # logged again; purge_step makes TensorBoard's reader drop them (steps >= purge_step).
        purge = info.step + 1 if info.resumed else None
        self.writer = board.SummaryWriter(log_dir=str(info.run_dir / "tb"), purge_step=purge)

    def log_step(self, step: int, values: Values) -> None:
        for key, value in finite(values).items():
            self.writer.add_scalar(key, value, step)

    def log_epoch(self, step: int, row: Values) -> None:
        for key, value in finite(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # an epoch's values reach the disk with its last.pt

    def log_final(self, step: int, final: Final) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = finite(final.metrics)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in final.params.items()}
        for summary in hparams(params, metrics):  # in this folder, not add_hparams' extra sub-folder
            self.writer.file_writer.add_summary(summary, step)
        for tag, figure in (final.figures() if final.figures else {}).items():
            self.writer.add_figure(tag, figure, step)

    def close(self, *, finished: bool) -> None:
        self.writer.close()


class MLflowLogger:
    """One MLflow run per run folder: params, tags, per-epoch metrics (step = epoch), artifacts."""

    def __init__(self, info: RunInfo) -> None:
        mlflow = import_optional("mlflow", extra="track", purpose="--log mlflow")
        # A tracking server that does not answer costs one short wait, not MLflow's default
        # minutes of retries per call (the user's own settings of these win).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.entities = import_optional("mlflow.entities", extra="track", purpose="--log mlflow")
        saved = read_mlflow_file(info.run_dir) if info.resumed else None
        uri = info.mlflow_uri or (saved or {}).get("tracking_uri") or mlflow.get_tracking_uri()
        self.client = mlflow.tracking.MlflowClient(uri)
        self.logged: set[int] = set()  # epochs this MLflow run already holds (a resumed run logs each once)
        if saved is not None and saved.get("tracking_uri") == uri:
            self.run_id = str(saved["run_id"])
            self.client.update_run(self.run_id, status="RUNNING")
            self.catch_up(info.history)
        else:
            self.run_id = self.start(info, uri)

    def start(self, info: RunInfo, uri: str) -> str:
        found = self.client.get_experiment_by_name(EXPERIMENT)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(EXPERIMENT)
        run_id = str(self.client.create_run(experiment, run_name=info.run_dir.name, tags=info.tags).info.run_id)
        items = [self.entities.Param(k, str(v)[:6000]) for k, v in info.params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[start : start + 100])
        (info.run_dir / MLFLOW_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
        return run_id

    def catch_up(self, history: list[dict[str, float]]) -> None:
        """Log the epochs the stopped process finished but did not log (killed in between); the
        epochs it logged past its checkpoint are trained again identically and not logged twice."""
        self.logged = {int(m.step) for m in self.client.get_metric_history(self.run_id, "epoch")}
        for row in history:
            self.log_epoch(0, row)

    def log_step(self, step: int, values: Values) -> None:
        """Train loss per step goes to TensorBoard only; MLflow keeps the per-epoch table."""

    def log_epoch(self, step: int, row: Values) -> None:
        epoch = int(row["epoch"])
        if epoch not in self.logged:
            self.log_values(row, epoch)
            self.logged.add(epoch)

    def log_values(self, values: Values, step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(k, v, now, step) for k, v in finite(values).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_final(self, step: int, final: Final) -> None:
        last = max(self.logged, default=0)
        if not any(m.step == last for m in self.client.get_metric_history(self.run_id, next(iter(final.metrics), "test_acc"))):
            self.log_values(final.metrics, last)  # at the last epoch's step; once, even when resumed after the end
        for path in final.files:
            self.client.log_artifact(self.run_id, str(path), artifact_path=path.parent.name if path.suffix == ".png" else None)

    def close(self, *, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


def read_mlflow_file(run_dir: Path) -> dict[str, Any] | None:
    try:
        saved = json.loads((run_dir / MLFLOW_FILE).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and "run_id" in saved else None


BUILDERS: dict[str, Callable[[RunInfo], Logger]] = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}


class Trackers:
    """Every asked-for tracker behind one Logger; a failing one is a warning and is dropped.
    A context manager: leaving it closes them (MLflow status FINISHED, or KILLED on an error)."""

    def __init__(self, loggers: dict[str, Logger]) -> None:
        self.loggers = loggers

    @property
    def wants_steps(self) -> bool:
        return "tensorboard" in self.loggers

    def log_step(self, step: int, values: Values) -> None:
        self.each("log_step", step, values)

    def log_epoch(self, step: int, row: Values) -> None:
        self.each("log_epoch", step, row)

    def log_final(self, step: int, final: Final) -> None:
        self.each("log_final", step, final)

    def close(self, *, finished: bool) -> None:
        self.each("close", finished=finished)
        self.loggers = {}

    def each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for name, logger in list(self.loggers.items()):
            try:
                getattr(logger, method)(*args, **kwargs)
            except Exception as err:  # any tracker failure: metrics.csv has every value anyway
                drop_warning(name, err)
                del self.loggers[name]

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close(finished=kind is None)


def drop_warning(name: str, err: BaseException) -> None:
    detail = " ".join(str(err).split())[:300]
    warnings.warn(f"{name} logging stopped ({type(err).__name__}: {detail}); training goes on, metrics.csv has every value", stacklevel=3)


def start_trackers(names: Iterable[str], info: RunInfo) -> Trackers:
    """Open each named tracker. A missing package is the user's error (exit 2, before training);
    any other failure to open (an unreachable server) is a warning without that tracker."""
    loggers: dict[str, Logger] = {}
    for name in names:
        try:
            loggers[name] = BUILDERS[name](info)
        except MissingDependencyError:
            raise
        except Exception as err:
            drop_warning(name, err)
    return Trackers(loggers)


def require_trackers(names: Iterable[str]) -> None:
    """Raise MissingDependencyError now if a named tracker's package is not installed."""
    modules = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
    for name in names:
        import_optional(modules[name], extra="track", purpose=f"--log {name}")
