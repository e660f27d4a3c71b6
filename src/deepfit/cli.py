"""The deepfit command: argparse subcommands -> config overrides -> the public API. The only
module that prints for people; every DeepfitError becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepfit.config import SHORTCUTS, TTA_MODES, Config, UnknownKeyError, config_from_dict, infer_task, load_config, set_value, suggest_key
from deepfit.errors import DeepfitError, NonFiniteError, StopRequested, did_you_mean
from deepfit.history import Row, format_epoch, plural
from deepfit.interrupts import early_interrupts

if TYPE_CHECKING:
    from deepfit.data import DataBundle
    from deepfit.inspect import LoadedRun, ShowOptions
    from deepfit.regression.split import RegressionData
    from deepfit.regression.table import Table
    from deepfit.trained import InitReport

# Top-level train flags -> dotted config keys: fit()'s keyword shortcuts, plus the flags that name
# a source or model (fit() takes those as objects too) and the task-specific ones.
TRAIN_FLAGS = {
    **SHORTCUTS,
    "data": "data.name",
    "model": "model.name",
    "log": "train.log",
    "target": "data.target",
    "features": "data.features",
}


class UsageError(DeepfitError):
    """A command line that argparse or the override parser rejects."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit code 2, no usage dump
        command = self.prog.removeprefix("deepfit").strip()  # main() already says "deepfit: error:"
        message = suggest_choice(message)
        raise UsageError(f"{command}: {message}" if command else message)


def suggest_choice(message: str) -> str:
    """argparse's "invalid choice: 'trian' (choose from 'train', ...)" with "; did you mean train?" added."""
    import re

    found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if found is None:
        return message
    hint = did_you_mean(found.group(1), re.findall(r"'([^']*)'", found.group(2)))
    return message.replace(f"'{found.group(1)}'", f"'{found.group(1)}'{hint}", 1) if hint else message


def build_parser() -> argparse.ArgumentParser:
    from deepfit import __version__

    parser = Parser(
        prog="deepfit",
        description="Train, evaluate, explain, export and serve PyTorch models: image classifiers, regression on tables, node classification on graphs.",
    )
    parser.add_argument("--version", action="version", version=f"deepfit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_train_parser(commands.add_parser("train", help="train a model and write a run folder"))
    add_models_parser(commands.add_parser("models", help="list the registered models, or summarize one layer by layer"))
    add_show_parser(commands.add_parser("show", help="draw a figure of a run into its plots/ folder"))
    report = commands.add_parser("report", help="write a run's self-contained HTML report")
    report.add_argument("run", metavar="RUN", help="run folder or checkpoint")
    report.add_argument("--out", help="HTML file to write (default RUN/report.html)")
    add_evaluate_parser(commands.add_parser("evaluate", help="score a trained model: per-class metrics, confusion matrix"))
    add_export_parser(commands.add_parser("export", help="export a checkpoint to ONNX or TorchScript, checked against PyTorch"))
    add_predict_parser(commands.add_parser("predict", help="classify image files, folders, globs, zips of images or CSV pixel rows"))
    add_data_parser(commands.add_parser("data", help="describe a data source or draw a grid of its labelled samples"))
    add_lr_find_parser(commands.add_parser("lr-find", help="sweep the learning rate, plot loss against it, suggest one"))
    add_serve_parser(commands.add_parser("serve", help="serve a checkpoint as an HTTP prediction API and web page"))
    return parser


def add_train_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (overridden by the flags)")
    parser.add_argument("--task", help="image (default), regression or node")
    parser.add_argument("--data", help="dataset name (digits, mnist, fashion-mnist, ...) or path")
    parser.add_argument("--data-dir", help="folder holding the dataset files")
    parser.add_argument("--model", help="registered model name (see `deepfit models`)")
    parser.add_argument("--epochs", help="passes over the training split")
    parser.add_argument("--seed", help="random seed")
    parser.add_argument("--device", help="auto, cpu, cuda or mps")
    parser.add_argument("--out", help="run folder, new or empty (default runs/<data>-<model>-<time>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from checkpoints/last.pt (auto: --out's)")
    parser.add_argument("--devices", metavar="N", type=int, help="train on N ranks of this machine via torchrun")
    parser.add_argument("--checkpoint-every", metavar="STEPS", help="also checkpoint every STEPS batches")
    parser.add_argument("--keep-last", metavar="K", help="step checkpoints to keep")
    parser.add_argument("--monitor", help="metric for best.pt and early stopping (val_acc, val_loss, val_f1, ...)")
    parser.add_argument("--time-limit", help="wall-time budget, e.g. 5m; ends with a resumable checkpoint")
    parser.add_argument("--init-from", metavar="RUN_OR_CHECKPOINT", help="start from an earlier run's weights")
    parser.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--log", metavar="TRACKERS", help="also log to tensorboard, mlflow or tensorboard,mlflow (needs deepfit[track])")
    parser.add_argument("--target", metavar="COLUMN", help="regression: the CSV column to predict")
    parser.add_argument("--features", metavar="A,B,C", help="regression: the CSV feature columns (default: every numeric one)")
    parser.epilog = "Any config field can be set as --section.field VALUE, e.g. --optim.lr 0.01 --sched.name onecycle."


def parse_overrides(extra: Sequence[str]) -> list[tuple[str, str]]:
    """['--optim.lr', '0.01', '--data.skip-bad=true'] -> [('optim.lr', '0.01'), ('data.skip-bad', 'true')]"""
    pairs, items = [], list(extra)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--") or "." not in flag:
            suggestion = suggest_key(flag.removeprefix("--").partition("=")[0]) if flag.startswith("--") else None
            hint = f"did you mean --{suggestion}? " if suggestion else ""
            raise UsageError(f"unrecognised argument {flag!r}; {hint}config fields are set as --section.field VALUE")
        key, eq, value = flag[2:].partition("=")
        if not eq:
            if not items or items[0].startswith("--"):
                raise UsageError(f"{flag} needs a value")
            value = items.pop(0)
        pairs.append((key, value))
    return pairs


def resolve_train_config(args: argparse.Namespace, extra: Sequence[str]) -> Config:
    """Defaults (the task's) < the resumed run's config < --config YAML < flags < dotted overrides.
    The task is data.task, or the one --data implies (line -> regression). A resumed run may not
    change what its checkpoint restores (checkpoint.refuse_resume_changes)."""
    saved = resumed_config(Path(args.resume)) if args.resume else None
    config = layered_config(copy.deepcopy(saved) if saved else Config(), args, extra)
    task = infer_task(config.data)
    if task != "image" and saved is None:  # a fresh run of another task layers over that task's defaults
        config = layered_config(task_defaults(task), args, extra)
    config.data.task = task  # type: ignore[assignment]
    if saved:
        from deepfit.checkpoint import refuse_resume_changes, require_unclaimed

        refuse_resume_changes(saved, config, Path(args.resume))
        require_unclaimed(Path(args.resume))  # before "resuming ..." is printed or ranks start
    return config


def layered_config(config: Config, args: argparse.Namespace, extra: Sequence[str]) -> Config:
    if args.config:
        config = load_config(args.config, config)
    for attr, key in TRAIN_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None:
            set_value(config, key, value)
    if args.download:
        config.data.download = True
    if args.no_progress:
        config.train.progress = False
    for key, value in parse_overrides(extra):
        set_flag(config, key, value)
    return config


def set_flag(config: Config, key: str, value: str) -> None:
    """set_value for a --section.field flag: an unknown one is named, and its close match, as flags."""
    try:
        set_value(config, key, value)
    except UnknownKeyError as err:
        hint = f"; did you mean --{err.suggestion}?" if err.suggestion else "; see `deepfit train --help` and src/deepfit/config.py"
        raise UsageError(f"unknown option --{key}{hint}") from None


def resumed_config(run_dir: Path) -> Config:
    from deepfit.checkpoint import last_checkpoint, load_checkpoint

    state = load_checkpoint(last_checkpoint(run_dir))
    return config_from_dict(state["config"])


def resume_lines(run_dir: Path, config: Config) -> list[str]:
    """Where a resumed run picks up, and what --epochs did to its schedule (fit rebuilds a
    per-step schedule for a new length from the step the run stands at)."""
    from deepfit.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    done, step, planned = int(state["epoch"]), int(state["step"]), int(state["config"]["train"]["epochs"])
    lines = [f"resuming {run_dir} at epoch {done + 1}, step {step}"]
    if done >= config.train.epochs:
        lines[0] = f"resuming {run_dir}: it has trained {plural(done, 'epoch')}, nothing left to train for --epochs {config.train.epochs}"
    elif planned != config.train.epochs and config.sched.name != "plateau" and (config.sched.name != "none" or config.sched.warmup_epochs):
        lines.append(
            f"the {config.sched.name} schedule was planned for {plural(planned, 'epoch')}: rebuilt for {config.train.epochs}, from step {step}"
        )
    return lines


def refuse_ranks(task: str, devices: int | None) -> None:
    """Regression and node runs train in one process (a table or a graph is a few full batches);
    N ranks (--devices N, or torchrun) would each write the same run folder."""
    from deepfit.distributed import env_world

    ranks = env_world().size
    if (devices or 1) > 1:
        raise UsageError(f"--devices {devices}: {task} runs train in one process; train without --devices")
    if ranks > 1:
        raise UsageError(f"torchrun started {ranks} ranks: {task} runs train in one process; run deepfit train without torchrun")


def tqdm_progress(batches: Iterable[Any], description: str, total: int) -> Iterable[Any]:
    from tqdm import tqdm

    return tqdm(batches, desc=description, total=total, leave=False, unit="batch", dynamic_ncols=True, file=sys.stderr)


def cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from deepfit import launch  # light: torch loads only after the flags are checked

    if args.devices is not None and args.devices < 1:  # 0 and -1 trained in one process, as if left out
        raise UsageError(f"--devices must be at least 1, got {args.devices}")
    args.resume = launch.resolve_resume(args.resume, args.out)
    config = resolve_train_config(args, extra)  # bad flags fail before torch loads
    refuse_config_out(args, config, extra)
    if args.console and not launch.wants_launch(args.devices):
        import_for_training()
    if config.data.task in ("regression", "node"):
        refuse_ranks(config.data.task, args.devices)
        return train_regression(config, args) if config.data.task == "regression" else train_node(config, args)
    if launch.wants_launch(args.devices):
        return train_on_devices(args, config)
    from deepfit.fit import fit

    main_rank = launch.is_rank0()  # under torchrun only rank 0 prints progress
    echo, progress = rank_outputs(args, config) if main_rank else (None, None)
    result = fit(config, resume=args.resume, progress=progress, on_epoch=echo, on_start=print_image_data if main_rank else None)
    return print_fit_result(result, config.train.monitor) if main_rank else 0


def refuse_config_out(args: argparse.Namespace, config: Config, extra: Sequence[str]) -> None:
    """--config RUN/config.yaml (training a run's config again) names that run as train.out: say
    where the folder came from, and the flag that trains the config again elsewhere."""
    given = args.out is not None or args.resume or any(item.startswith("--train.out") for item in extra)
    out = config.train.out
    if args.config and not given and out and (Path(out) / "checkpoints" / "last.pt").is_file():
        raise UsageError(
            f"{out} already holds a run (train.out in {args.config}); continue it with --resume {out}, or train this config"
            " again with --out NEW"
        )


def print_image_data(bundle: DataBundle) -> None:
    """What the run trains on, before its first epoch: images, their shape, the split, the classes."""
    from deepfit.data.bundle import resized_count

    sizes = [len(s) if s is not None else 0 for s in (bundle.train, bundle.val, bundle.test)]
    shape = "x".join(map(str, bundle.input_shape))
    resized = resized_count(bundle.sizes, bundle.input_shape)
    note = f"; {resized} resized to {shape.split('x', 1)[1]} (deepfit data info lists the sizes)" if resized else ""
    print(
        f"data: {bundle.source}: {sum(sizes)} images {shape} (train / val / test {' / '.join(map(str, sizes))}),"
        f" {bundle.num_classes} classes{note}",
        flush=True,
    )


def import_for_training() -> None:
    """torch, and torch._dynamo (torch's optimizers import it when first used), imported with the
    garbage collector paused and then frozen: collections during these imports walked the growing
    heap again and again (about 0.5 s of a start-up on 2 cores), and later ones skip it. For the
    console script only: a frozen heap is never collected, which no caller of main() should inherit."""
    import gc

    gc.disable()
    try:
        import torch._dynamo  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


def print_fit_result(result: Any, monitor: str) -> int:
    """What a finished image run tells people: init report, early stop, skipped files, test scores, folder."""
    if result.init is not None:
        print(format_init(result.init))
    print_early_stop(result.stopped_early, result.run_dir)
    if result.data.skipped:
        from deepfit.fitparts import SKIPPED_FILE

        print(f"skipped {len(result.data.skipped)} bad file(s), listed in {result.run_dir / SKIPPED_FILE}")
    weights = f" ({result.weights}, epoch {result.weights_epoch})"  # what evaluate, predict and export use
    print(final_line(result.metrics, result.history, monitor, weights))
    print(f"run folder: {result.run_dir}")
    return 0


def print_early_stop(reason: str | None, run_dir: Path) -> None:
    """Why a run (any task) ended before train.epochs; a time limit leaves it to resume."""
    if reason:
        print(f"stopped early: {reason}")
        if reason == "time limit":
            print(f"resume with: deepfit train --resume {run_dir}")


def final_line(metrics: dict[str, float], history: list[Row], monitor: str, weights: str = "") -> str:
    """The run's held-out result: the test metrics (and the weights that scored them), else the
    best epoch's validation metrics."""
    if "test_acc" in metrics:
        return f"test_acc {metrics['test_acc']:.2%}{weights}  test_loss {metrics['test_loss']:.4f}"
    if not history:
        return "no epoch finished"
    split = "val" if any(key.startswith("val_") for key in history[-1]) else "train"
    key = monitor if monitor.startswith(f"{split}_") else f"{split}_{monitor.partition('_')[2]}"
    scored = [row for row in history if key in row] or history
    pick = min if key.endswith("loss") else max
    best = pick(scored, key=lambda row: row.get(key, 0.0))
    shown = "  ".join(
        f"{k} {best[k]:.2%}" if k.endswith("acc") else f"{k} {best[k]:.4f}" for k in (f"{split}_acc", f"{split}_loss") if k in best
    )
    missing = "no test split" if split == "val" else "no test or validation split"
    return f"{missing}: best {key} at epoch {int(best['epoch'])}: {shown}"


def rank_outputs(args: argparse.Namespace, config: Config) -> tuple[Callable[[Row], None], Any]:
    """Rank 0's epoch lines and progress bar; a note first when a run resumes on another number of ranks."""
    from deepfit import launch

    if args.resume:
        print("\n".join(resume_lines(Path(args.resume), config)), flush=True)
    if args.resume and (note := launch.world_change_note(Path(args.resume))):
        print(note)
    progress = tqdm_progress if config.train.progress and sys.stderr.isatty() else None  # redirected: epoch lines only
    return print_epoch(config.train.epochs), progress


def train_on_devices(args: argparse.Namespace, config: Config) -> int:
    """Checked here first, so bad input stops before any rank starts; then torchrun in-process."""
    from deepfit import launch
    from deepfit.config import validate

    validate(config)
    launch.require_devices(config.train.device, args.devices)
    code, message = launch.launch(args.argv, args.devices)
    if message:
        print(f"deepfit: {message}", file=sys.stderr)
    return code


def format_init(init: InitReport) -> str:
    """What --init-from copied, and each model tensor it left as built."""
    lines = [f"init-from {init.path}: copied {len(init.copied)} tensors, {len(init.skipped)} did not match"]
    lines += [f"  not matched: {entry}" for entry in init.skipped]
    return "\n".join(lines)


def r2_text(value: float) -> str:
    """R^2 to 4 places; undefined (NaN) for one row or equal targets, said so."""
    return f"{value:.4f}" if value == value else "n/a (needs targets that differ)"


def print_epoch(epochs: int) -> Callable[[Row], None]:
    def echo(row: Row) -> None:
        print(format_epoch(row, epochs), flush=True)

    return echo


def add_models_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", nargs="?", default="list", metavar="ACTION", help="list (default), or summary (NAME alone means summary NAME)"
    )
    parser.add_argument("name", nargs="?", metavar="NAME", help="summary: the registered model")
    parser.add_argument("--input", metavar="CxHxW|F", help="summary: image shape (default 1x28x28), or features per row or node")
    parser.add_argument("--classes", type=int, default=10, metavar="N", help="summary: number of classes (default 10)")
    parser.add_argument("--task", default="image", choices=TASKS, help="the image (default), regression or node models")
    parser.epilog = "summary takes model settings as in train: --model.hidden 200 --model.activation sigmoid ..."


TASKS = ("image", "regression", "node")


def task_models(task: str) -> Any:
    """A task's model registry, imported only when asked for (the graph one imports no PyG)."""
    if task == "regression":
        from deepfit.regression.models import REGRESSION_MODELS

        return REGRESSION_MODELS
    if task == "node":
        from deepfit.graph.models import NODE_MODELS

        return NODE_MODELS
    from deepfit.models import MODELS

    return MODELS


def cmd_models(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from deepfit.models import format_summary, summarize_model

    if args.action not in ("list", "summary"):  # deepfit models cnn_bn: the summary of cnn_bn
        if args.name:
            raise UsageError(f"models: unknown action {args.action!r}; use list, or summary NAME")
        args.action, args.name = "summary", args.action
    if args.action == "list":
        if args.name or extra:
            raise UsageError("deepfit models lists them all; use deepfit models summary NAME --input CxHxW")
        described = task_models(args.task).describe()
        width = max(len(name) for name, _ in described)
        for name, description in described:
            print(f"{name:<{width}}  {description}")
        return 0
    if not args.name or args.classes < 1:
        raise UsageError("usage: deepfit models summary NAME --input CxHxW [--classes N] (N >= 1)")
    task = summary_task(args.name, args.task)
    config = task_defaults(task)
    set_value(config, "model.name", args.name)
    for key, value in parse_overrides(extra):
        if not key.startswith("model."):
            raise UsageError(f"--{key}: deepfit models summary takes only --model.* settings")
        set_flag(config, key, value)
    model, shape, extra_inputs = summary_model(task, config, args)
    print(format_summary(summarize_model(model, shape, extra_inputs=extra_inputs), title=args.name))
    return 0


def summary_task(name: str, task: str) -> str:
    """--task when given; else image, or the one other task that alone has a model of that name."""
    if task != "image" or name in task_models("image"):
        return task
    others = [t for t in TASKS[1:] if name in task_models(t)]
    return others[0] if len(others) == 1 else task


def summary_model(task: str, config: Config, args: argparse.Namespace) -> tuple[Any, tuple[int, ...], tuple[Any, ...]]:
    """The model to summarise, the shape of one input item, and any further forward arguments."""
    if task == "image":
        from deepfit.models import build_model

        shape = input_shape(args.input or "1x28x28")
        return build_model(config.model, input_shape=shape, num_classes=args.classes), shape, ()
    features = feature_count(args.input, task, args.name)
    if task == "regression":
        from deepfit.regression.models import build_regression_model

        return build_regression_model(config.model, num_features=features), (features,), ()
    import torch

    from deepfit.graph.models import build_node_model

    m = config.model
    model = build_node_model(m.name, in_features=features, num_classes=args.classes, hidden=list(m.hidden), dropout=m.dropout)
    return model, (features,), (torch.tensor([[0, 1], [1, 0]]),)  # two nodes joined by an edge


def feature_count(text: str | None, task: str, name: str) -> int:
    what = "a table row" if task == "regression" else "a node"
    if text is None or not text.isdigit() or int(text) < 1:
        given = "" if text is None else f" ({text!r} is not a count)"
        raise UsageError(f"{name} is a {task} model: give --input F, the number of features of {what}{given}, for example --input 10")
    return int(text)


def input_shape(text: str) -> tuple[int, int, int]:
    """'1x28x28' -> (1, 28, 28)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        count = "; a feature count is for --task regression or --task node" if text.isdigit() else ""
        raise UsageError(f"--input {text!r} is not CxHxW (for example 1x28x28 or 3x32x32){count}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def add_lr_find_parser(parser: argparse.ArgumentParser) -> None:
    add_train_parser(parser)
    parser.add_argument("--start-lr", type=float, default=1e-7, help="first learning rate of the sweep (default 1e-7)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="last learning rate of the sweep (default 10)")
    parser.add_argument("--steps", type=int, default=200, help="batches in the sweep, one optimizer step each (default 200)")
    parser.description = "Writes lr-find.png and lr-find.csv into --out (default runs/lr-find-<data>-<model>-<time>)."


def cmd_lr_find(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if args.resume:
        raise UsageError("lr-find starts from scratch (or --init-from); --resume is for train")
    refuse_train_only(args)
    config = resolve_train_config(args, extra)
    if config.data.task != "image":
        raise UsageError(f"lr-find sweeps image classifiers; for a {config.data.task} run set --optim.lr directly")
    from deepfit.lrfind import find_lr, save_lr_find

    result = find_lr(config, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps)
    folder = Path(config.train.out) if config.train.out else lr_find_folder(config)
    files = save_lr_find(result, folder)
    print(f"swept {len(result.lrs)} of {result.steps} steps, lr {result.start_lr:.3g} -> {result.lrs[-1]:.3g}: {result.stopped}")
    print(f"lowest smoothed loss {min(result.smoothed):.4f} at lr {result.min_loss_lr:.3g}")
    steep = f"; steepest descent at {result.steepest:.3g}" if result.steepest is not None else ""
    print(f"suggested lr {result.suggestion:.3g} (lowest-loss lr / 10){steep}")
    print(f"train with: --optim.lr {result.suggestion:.3g}")
    print(f"plot: {files[0]}")
    return 0


TRAIN_ONLY = ("epochs", "devices", "checkpoint_every", "keep_last", "monitor", "time_limit", "log")


def refuse_train_only(args: argparse.Namespace) -> None:
    """lr-find shares train's flags; those of a whole run (its length, ranks, checkpoints, trackers)
    were taken and ignored without a word."""
    given = [f"--{name.replace('_', '-')}" for name in TRAIN_ONLY if getattr(args, name) is not None]
    if given:
        raise UsageError(
            f"{', '.join(given)}: not used by lr-find, which sweeps --steps batches in one process; leave {'it' if len(given) == 1 else 'them'} out"
        )


def lr_find_folder(config: Config) -> Path:
    from datetime import datetime

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"lr-find-{Path(config.data.name).stem}-{config.model.name}-{stamp}"


def add_show_parser(parser: argparse.ArgumentParser) -> None:
    kinds = (
        "curves, samples, predictions, confusion, mistakes, filters, features, gradcam, or all of them "
        "(a regression run: curves, predicted, residuals, feature; a node run: curves, embeddings, graph, inputs; all for either)"
    )
    parser.add_argument("kind", metavar="KIND", help=kinds)
    parser.add_argument("run", metavar="RUN", help="run folder or checkpoint")
    parser.add_argument("--image", help="an image file for features and gradcam (default: test images)")
    parser.add_argument("--layer", help="layer name for filters, features and gradcam (a wrong name lists them)")
    parser.add_argument("--count", type=int, help="how many images (or feature maps) to draw")
    parser.add_argument("--data-dir", help="folder holding the run's dataset files, as in train (figures of its test images)")
    parser.add_argument("--data", metavar="PATH", help="where the run's own data (image folder, zip or CSV) is now, when it moved")


def cmd_show(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from deepfit.inspect import ShowOptions, load_run, make_figure
    from deepfit.plots import save_figure

    if Path(args.kind).exists() and not Path(args.run).exists():  # `show RUN KIND`: the two swapped
        kinds = (*figure_kinds(task_of(args.kind)), "all")
        if args.run not in kinds:
            raise UsageError(f"unknown figure {args.run!r}; valid: {', '.join(kinds)}")
        raise UsageError(f"the figure comes first: deepfit show {args.run} {args.kind}")
    if args.count is not None and args.count < 1:  # 0 drew the default count, -3 all but 3 of the test images
        raise UsageError("--count must be at least 1")
    task = task_of(args.run)  # reads the checkpoint: once
    if task == "regression":
        return show_regression(args)
    if task == "node":
        return show_node(args)
    if args.kind == "curves":  # needs metrics.csv only, not the model (a run of your own nn.Module too)
        return show_curves(Path(args.run))
    run = load_run(args.run)  # once: `show all` draws every figure from one loaded model
    if args.data_dir is not None:
        run.config.data.dir = str(Path(args.data_dir).expanduser().resolve())
    if args.data is not None:  # the run's data, moved: its classes are checked when its images are read
        from deepfit.data import anchor_paths

        run.config.data.name = args.data
        anchor_paths(run.config.data)
    options = ShowOptions(image=args.image, layer=args.layer, count=args.count)
    variant = "".join(f"-{Path(part).stem if part == args.image else part}" for part in (args.layer, args.image) if part)
    if args.kind != "all":
        print(save_figure(make_figure(run, args.kind, options), run.run_dir / "plots" / f"{args.kind}{variant}.png"))
        return 0
    return show_all(run, options, variant)


def figure_kinds(task: str) -> tuple[str, ...]:
    """The figures `deepfit show` draws for a run of `task` ('all' aside)."""
    if task == "regression":
        from deepfit.regression.views import FIGURE_KINDS as REGRESSION_FIGURES

        return REGRESSION_FIGURES
    if task == "node":
        from deepfit.graph.figures import NODE_FIGURES

        return NODE_FIGURES
    from deepfit.inspect import FIGURE_KINDS

    return FIGURE_KINDS


def show_all(run: LoadedRun, options: ShowOptions, variant: str) -> int:
    """Every figure of an image run from one loaded model; one that cannot be drawn is a line on
    stderr (exit 1) and the others still come."""
    from deepfit.inspect import FIGURE_KINDS, make_figure
    from deepfit.plots import save_figure

    failed, need_model = 0, []
    for kind in FIGURE_KINDS:
        try:
            print(save_figure(make_figure(run, kind, options), run.run_dir / "plots" / f"{kind}{variant}.png"))
        except DeepfitError as err:  # e.g. no convolution to draw filters of: the other figures still come
            if isinstance(run.built, DeepfitError) and str(err) == str(run.built):
                need_model.append(kind)  # a run of your own nn.Module, its class not named: said once below
                continue
            print(f"deepfit: show {kind}: {err}", file=sys.stderr)
            failed += 1
    if need_model:
        print(f"deepfit: show all: {', '.join(need_model)} need the model: {run.built}", file=sys.stderr)
    return 1 if failed else 0


def show_curves(run: Path) -> int:
    from deepfit.history import LR_FILE, read_lr_csv, read_metrics_csv
    from deepfit.plots import plot_curves, save_figure

    run_dir = run if run.is_dir() else run.parent.parent  # runs/<name>/checkpoints/x.pt
    if not (run_dir / "metrics.csv").is_file():
        raise UsageError(f"{run_dir} has no metrics.csv to draw curves from")
    figure = plot_curves(read_metrics_csv(run_dir / "metrics.csv"), lrs=read_lr_csv(run_dir / LR_FILE))
    print(save_figure(figure, run_dir / "plots" / "curves.png"))
    return 0


def cmd_report(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from deepfit.report import write_report

    task = task_of(args.run)  # reads the checkpoint: once
    if task == "regression":
        return report_regression(args)
    if task == "node":
        return report_node(args)
    print(write_report(args.run, out=args.out))
    return 0


def add_evaluate_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder (best.pt, else last.pt) or checkpoint file")
    parser.add_argument("--data", help="dataset name or path to score on (default: the run's own data)")
    parser.add_argument("--data-dir", help="folder holding the dataset files, as in train")
    parser.add_argument(
        "--split", choices=["test", "val", "all"], help="which split (default test; all of a --data source without a test split)"
    )
    parser.add_argument(
        "--tta",
        choices=TTA_MODES,
        help="average each image's logits with its mirror's (flip-safe data only), its 1-pixel shifts' or both "
        "(default: the run's own train.tta, as its final test line)",
    )
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable image files out and list them (default: stop on them)")


def cmd_evaluate(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from deepfit.data.bundle import bad_file_lines
    from deepfit.evaluation import evaluate_checkpoint, format_report

    task = task_of(args.run)  # reads the checkpoint: once
    if task == "regression":
        return evaluate_regression_cmd(args)
    if task == "node":
        return evaluate_node(args)
    result = evaluate_checkpoint(args.run, data=args.data, split=args.split, tta=args.tta, data_dir=args.data_dir, skip_bad=args.skip_bad)
    print(format_report(result.report))
    if result.skipped:
        print(f"left out {len(result.skipped)} bad file(s) of the data (any split):")
        print(bad_file_lines(result.skipped))
    print(f"report: {result.report_path}")
    print(f"confusion matrix: {result.figure_path}")
    return 0


def add_export_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder or checkpoint file")
    parser.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="file format")
    parser.add_argument("--out", metavar="FILE", help="file to write (default RUN/export/model.onnx or .torchscript.pt)")


def cmd_export(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from deepfit.export import TOLERANCE, export_checkpoint

    task = task_of(args.checkpoint)  # reads the checkpoint: once
    if task == "regression":
        return export_regression_cmd(args)
    if task == "node":
        return export_node(args)
    result = export_checkpoint(args.checkpoint, format=args.format, out=args.out)
    sizes = ", ".join(str(b) for b in result.batch_sizes)
    print(f"verified: max abs difference {result.max_abs_diff:.3g} vs PyTorch (tolerance {TOLERANCE:g}; batches of {sizes})")
    exporter = f" ({result.exporter} exporter)" if result.exporter else ""
    print(f"{result.format}{exporter}: {result.path}")
    return 0


def add_predict_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder or checkpoint file")
    parser.add_argument(
        "paths", metavar="PATH", nargs="+", help="image files, folders (recursive), globs, .zip files of images or CSV files"
    )
    parser.add_argument("--topk", type=int, help="classes to list per image or node (default 3)")
    parser.add_argument("--format", default="table", choices=["table", "json", "csv"], help="output format (default table)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--id-column", metavar="COLUMN", help="regression: copy this CSV column beside each prediction")
    parser.add_argument("--tta", choices=TTA_MODES, help="test-time augmentation, as in evaluate (default: the run's own train.tta)")


def check_predict_flags(args: argparse.Namespace, task: str) -> None:
    """The flags that do not apply to the checkpoint's task, refused rather than ignored; --topk
    defaults to 3 where it applies."""
    if args.topk is not None and args.topk < 1:
        raise UsageError("--topk must be at least 1")
    if task in ("regression", "node") and args.tta not in (None, "none"):
        raise UsageError(f"--tta transforms images; a {task} model has none")
    if task == "regression" and args.topk is not None:
        raise UsageError("--topk lists classes; a regression model predicts one value per row")
    args.topk = 3 if args.topk is None else args.topk


def cmd_predict(args: argparse.Namespace, extra: Sequence[str]) -> int:
    import csv
    import json

    from deepfit.predict import Predictor, csv_rows, format_table

    task = task_of(args.checkpoint)
    check_predict_flags(args, task)
    if task == "regression":
        return predict_regression_cmd(args)
    if task == "node":
        return predict_node(args)
    if args.id_column:
        raise UsageError("--id-column is for regression checkpoints (CSV rows in, values out)")
    predictor = Predictor.from_checkpoint(args.checkpoint, tta=args.tta)
    progress = tqdm_files if not args.no_progress and sys.stderr.isatty() else None
    result = predictor.predict_paths(args.paths, topk=args.topk, progress=progress)
    for failure in result.failures:
        print(f"deepfit: cannot predict {failure.path}: {failure.reason}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps([p.to_dict() for p in result.predictions], indent=2))
    elif args.format == "csv":
        csv.writer(sys.stdout, lineterminator="\n").writerows(csv_rows(result.predictions))
    elif result.predictions:
        print(format_table(result.predictions))
    return 1 if result.failures else 0


def tqdm_files(items: Iterable[Any], description: str, total: int) -> Iterable[Any]:
    from tqdm import tqdm

    return tqdm(items, desc=description, total=total, leave=False, unit="file", dynamic_ncols=True, file=sys.stderr)


def add_data_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=["info", "show"],
        help="info: splits, classes, shape, stats; show: a PNG grid of samples (a graph: its A and X; a table: each feature against the target)",
    )
    parser.add_argument("source", metavar="SOURCE", help="dataset name (digits, mnist, cifar10, ...) or a folder, .zip, .csv or .csv.gz")
    parser.add_argument("--data-dir", help="folder holding the dataset files")
    parser.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    parser.add_argument("--seed", default="0", help="seed of the validation split and of the samples shown")
    parser.add_argument("--out", metavar="PNG", help="show: the file to write (default SOURCE-samples.png)")
    parser.add_argument("--count", type=int, default=32, help="show: how many samples (default 32)")
    parser.add_argument("--target", metavar="COLUMN", help="a regression table: the column to predict (as in train)")
    parser.add_argument("--features", metavar="A,B,C", help="a regression table: the feature columns (default: every numeric one)")
    parser.epilog = (
        "Data settings are given as in train: --data.image-size 64 --data.channels 3 --data.skip-bad true ... "
        "A regression table: deepfit data info|show FILE.csv --target COLUMN (show: each feature against the target); "
        "a graph: deepfit data info karate|cora (or EDGES.csv --data.task node --data.nodes NODES.csv)"
    )


def data_config(args: argparse.Namespace, extra: Sequence[str], base: Config | None = None) -> Config:
    """The train config's data section from SOURCE, --data-dir, --download and --data.* overrides
    (over `base`: a task's defaults)."""
    config = base or Config()
    set_value(config, "data.name", args.source)
    set_value(config, "train.seed", args.seed)
    if args.data_dir is not None:
        set_value(config, "data.dir", args.data_dir)
    config.data.download = bool(args.download)
    for flag, key in (("target", "data.target"), ("features", "data.features")):
        if getattr(args, flag, None) is not None:
            set_value(config, key, getattr(args, flag))
    for key, value in parse_overrides(extra):
        if not key.startswith("data."):
            raise UsageError(f"--{key}: deepfit data takes only --data.* settings")
        set_flag(config, key, value)
    return config


def cmd_data(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    config = data_config(args, extra)
    task = infer_task(config.data)  # as train infers it: a target column is a table, karate and cora are graphs
    if task == "regression":
        return describe_table(config, args)
    if task == "node":
        return describe_graph(data_config(args, extra, base=task_defaults("node")), args)
    if args.action == "info":
        config.data.skip_bad = True  # describe the readable images and list the bad ones (exit 1), whatever training would do
    from deepfit.data import build_data, load_images
    from deepfit.data.bundle import describe_bundle

    bundle = build_data(config.data, seed=config.train.seed)
    if args.action == "info":
        print(describe_bundle(bundle))
        return 1 if bundle.skipped else 0
    from deepfit.inspect import choose_sample
    from deepfit.plots import plot_samples, save_figure

    chosen = load_images(bundle.train.subset(choose_sample(len(bundle.train), args.count, seed=config.train.seed)))
    title = f"{args.source}: {len(chosen)} of {len(bundle.train):,} training images"
    figure = plot_samples(chosen.images.numpy(), chosen.labels.numpy(), bundle.classes, title=title)
    print(save_figure(figure, Path(args.out or f"{Path(args.source).stem}-samples.png")))
    return 0


def task_of(path: str) -> str:
    """The task of a run folder's or checkpoint's model (image for checkpoints from before tasks)."""
    from deepfit.checkpoint import checkpoint_task, load_checkpoint

    return checkpoint_task(load_checkpoint(path))


def task_defaults(task: str) -> Config:
    """The config a task's run starts from, before --config and the flags."""
    if task == "regression":
        from deepfit.regression import default_config

        return default_config()
    if task == "node":
        from deepfit.graph import node_defaults

        return node_defaults()
    return Config()


# -- regression task commands --


def train_regression(config: Config, args: argparse.Namespace) -> int:
    from deepfit.regression import fit_regression

    epochs = config.train.epochs
    progress = tqdm_progress if config.train.progress else None
    result = fit_regression(
        config,
        resume=args.resume,
        progress=progress,
        on_epoch=lambda row: print(format_regression_epoch(row, epochs), flush=True),
        on_start=print_regression_data,
    )
    print_early_stop(result.stopped_early, result.run_dir)
    metrics = result.metrics
    if metrics:
        print(
            f"test_mse {metrics['test_mse']:.4g}  test_rmse {metrics['test_rmse']:.4g}  test_mae {metrics['test_mae']:.4g}  test_r2 {r2_text(metrics['test_r2'])}"
        )
    else:  # a table too small to hold rows out
        print(f"no test rows to score: deepfit evaluate {result.run_dir} --data OTHER.csv scores another table")
    print(f"run folder: {result.run_dir}")
    return 0


def print_regression_data(data: RegressionData) -> None:
    """The table read, its split and what was left out of it: said before the first epoch."""
    table = data.table
    sizes = " / ".join(str(len(s)) if s is not None else "0" for s in (data.train, data.val, data.test))
    print(
        f"data: {table.source}: {len(table.target)} rows (train / val / test {sizes}), {len(table.feature_names)} feature(s) -> {table.schema.target}",
        *table_notes(table),
        sep="\n",
        flush=True,
    )


def table_notes(table: Table) -> list[str]:
    """What reading a regression table left out: text columns, stray text cells, rows with gaps."""
    lines = []
    if table.ignored:
        lines.append(f"ignored text column(s): {', '.join(table.ignored)} (one-hot encode them with --data.categorical onehot)")
    for name, where in table.strays.items():
        lines.append(f"column {name!r} holds numbers but {where}: fix or blank such cells (blank reads as missing) to use it")
    if table.dropped_rows:
        lines.append(f"dropped {table.dropped_rows} row(s) with missing values (--data.drop-missing)")
    return lines


def describe_graph(config: Config, args: argparse.Namespace) -> int:
    """deepfit data info for a graph: its size and split, then labelled nodes per class; show draws
    its adjacency and feature matrices (a neighbourhood of a large graph)."""
    from deepfit.columns import display_width, pad
    from deepfit.graph import graph_of

    graph = graph_of(config)
    if args.action == "show":
        from deepfit.graph.figures import plot_inputs
        from deepfit.plots import save_figure

        print(save_figure(plot_inputs(graph), Path(args.out or f"{Path(args.source).stem}-inputs.png")))
        return 0
    counts = [int((graph.labels == i).sum()) for i in range(len(graph.classes))]
    width = max(display_width(name) for name in ["class", *graph.classes])
    lines = [graph.summary(), "labelled nodes per class:"]
    lines += [f"  {pad(name, width)}  {count:>6}" for name, count in zip(graph.classes, counts, strict=True)]
    if (unlabelled := graph.num_nodes - sum(counts)) > 0:
        lines.append(f"{unlabelled} unlabelled node(s): deepfit predict predicts them")
    print("\n".join(lines))
    return 0


def describe_table(config: Config, args: argparse.Namespace) -> int:
    """deepfit data info for a regression table: its rows, features, target and what was left out;
    show: each feature against the target."""
    from deepfit.regression.sources import TABLES, load_table

    if config.data.name not in TABLES and not config.data.target:
        raise UsageError(f"{config.data.name}: name the column to predict with --target COLUMN")
    table = load_table(config.data)
    if args.action == "show":
        from deepfit.plots import save_figure
        from deepfit.regression.figures import plot_table

        title = f"{table.source}: {len(table.target):,} rows, each feature against {table.schema.target}"
        figure = plot_table(
            table.features, table.target, table.feature_names, target_name=table.schema.target, title=title, most=min(12, args.count)
        )
        print(save_figure(figure, Path(args.out or f"{Path(args.source).stem}-samples.png")))
        return 0
    print(f"{table.source}: {len(table.target)} rows, {len(table.feature_names)} feature(s) -> {table.schema.target}")
    print(f"features: {', '.join(table.feature_names)}")
    for line in table_notes(table):
        print(line)
    return 0


def format_regression_epoch(row: Row, epochs: int) -> str:
    """'epoch 3/50  train_loss 0.1234  val_loss 0.1301  val_rmse 2.95  val_r2 0.9312  lr 1.00e-01  0.0s'"""
    parts = [f"epoch {int(row['epoch'])}/{epochs}"]
    for key in ("train_loss", "val_loss", "val_rmse", "val_r2"):
        if key in row:
            parts.append(f"{key} {row[key]:.4g}" if key.endswith("rmse") else f"{key} {row[key]:.4f}")
    parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)


def evaluate_regression_cmd(args: argparse.Namespace) -> int:
    from deepfit.regression.evaluate import evaluate_regression

    if args.tta not in (None, "none"):
        raise UsageError("--tta transforms images; a regression model has none")
    if args.skip_bad:
        raise UsageError("--skip-bad leaves out bad image files; a regression table has none")
    result = evaluate_regression(args.run, data=args.data, split=args.split or "test")
    m = result.metrics
    print(f"{result.split}: {result.rows} rows  mse {m['mse']:.4g}  rmse {m['rmse']:.4g}  mae {m['mae']:.4g}  r2 {r2_text(m['r2'])}")
    print(f"report: {result.report_path}")
    print(f"figures: {', '.join(str(p) for p in result.figure_paths)}")
    return 0


def predict_regression_cmd(args: argparse.Namespace) -> int:
    import csv
    import json

    from deepfit.regression.predict import predict_csv
    from deepfit.regression.trained import load_regression_model

    result = predict_csv(load_regression_model(args.checkpoint), args.paths, id_column=args.id_column)
    for failure in result.failures:
        print(f"deepfit: cannot predict {failure.path} line {failure.line}: {failure.reason}", file=sys.stderr)
    rows = result.rows()
    if args.format == "json":
        print(json.dumps([{rows[0][0]: key, result.target: value} for key, value in zip(result.ids, result.values, strict=True)], indent=2))
    elif args.format == "csv":
        csv.writer(sys.stdout, lineterminator="\n").writerows(rows)
    else:
        width = max(len(row[0]) for row in rows)
        print("\n".join(f"{row[0]:<{width}}  {row[1]}" for row in rows))
    return 1 if result.failures else 0


def export_regression_cmd(args: argparse.Namespace) -> int:
    from deepfit.regression.export import export_regression

    result = export_regression(args.checkpoint, format=args.format, out=args.out)
    sizes = ", ".join(str(b) for b in result.batch_sizes)
    print(f"verified: max abs difference {result.max_abs_diff:.3g} vs PyTorch (tolerance {result.tolerance:.3g}; batches of {sizes})")
    print(f"{result.format}: {result.path}")
    return 0


def show_regression(args: argparse.Namespace) -> int:
    from deepfit.plots import save_figure
    from deepfit.regression.views import load_regression_run, make_regression_figure

    if args.image or args.layer or args.count or args.data_dir:
        raise UsageError(
            "--image, --layer, --count and --data-dir are for image runs; regression figures: curves, predicted, residuals, feature"
        )
    trained, data, run_dir = load_regression_run(args.run, data_path=args.data)
    if args.kind == "all":  # every figure the run can draw, as for an image run
        from deepfit.regression.views import save_run_figures

        print("\n".join(map(str, save_run_figures(trained.model, data, trained.history, run_dir / "plots"))))
        return 0
    figure = make_regression_figure(args.kind, trained.model, data, trained.history)
    print(save_figure(figure, run_dir / "plots" / f"{args.kind}.png"))
    return 0


def report_regression(args: argparse.Namespace) -> int:
    from deepfit.regression.report import write_regression_report

    print(write_regression_report(args.run, out=args.out))
    return 0


# -- node task commands --


def train_node(config: Config, args: argparse.Namespace) -> int:
    """deepfit train for data.task node (config resolved over the node defaults: Kipf & Welling)."""
    from deepfit.graph import fit_node

    epochs = config.train.epochs
    every = 1 if epochs <= 20 else 10  # an epoch takes milliseconds: a line per 10 of 200

    def echo(row: Row) -> None:
        if int(row["epoch"]) % every == 0 or int(row["epoch"]) == epochs:
            print(format_epoch(row, epochs), flush=True)

    result = fit_node(config, resume=args.resume, on_epoch=echo, on_start=lambda graph: print(graph.summary(), flush=True))
    print_early_stop(result.stopped_early, result.run_dir)
    print(f"trained {len(result.history)} epochs in {result.train_seconds:.1f}s")
    for key in ("test_acc", "test_loss"):
        if key in result.metrics:
            value = result.metrics[key]
            print(f"{key} {value:.2%}" if key.endswith("acc") else f"{key} {value:.4f}")
    print(f"run folder: {result.run_dir}")
    return 0


def evaluate_node(args: argparse.Namespace) -> int:
    from deepfit.graph.inference import evaluate_node_checkpoint, format_node_report

    if args.data or args.tta not in (None, "none") or args.skip_bad:
        raise UsageError("a node checkpoint is evaluated on its own graph: --data, --tta and --skip-bad do not apply")
    result = evaluate_node_checkpoint(args.run, split=args.split or "test")
    print(format_node_report(result.report))
    print(f"report: {result.report_path}")
    return 0


def predict_node(args: argparse.Namespace) -> int:
    import csv
    import json

    from deepfit.graph.inference import format_node_table, predict_nodes

    result = predict_nodes(args.checkpoint, list(args.paths), topk=args.topk)
    for node in result.unknown:
        print(f"deepfit: cannot predict node {node!r}: not a node of the checkpoint's graph", file=sys.stderr)
    if args.format == "json":
        print(json.dumps([p.to_dict() for p in result.predictions], indent=2))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["node", "label", "probability", "true_label", "split"])
        writer.writerows([p.node, p.label, f"{p.probability:.6f}", p.true_label or "", p.split] for p in result.predictions)
    elif result.predictions:
        print(format_node_table(result.predictions))
    return 1 if result.unknown else 0


def export_node(args: argparse.Namespace) -> int:
    from deepfit.graph.export import TOLERANCE, export_node_checkpoint

    result = export_node_checkpoint(args.checkpoint, format=args.format, out=args.out)
    print(f"verified: max abs difference {result.max_abs_diff:.3g} vs PyTorch (tolerance {TOLERANCE:g}; on {' and '.join(result.checks)})")
    print(f"{result.format}: {result.path}")
    return 0


def show_node(args: argparse.Namespace) -> int:
    from deepfit.graph import load_node_model
    from deepfit.graph.figures import node_figure
    from deepfit.graph.trained import run_folder
    from deepfit.plots import save_figure

    if args.image or args.layer or args.count or args.data_dir or args.data:
        raise UsageError(
            "--image, --layer, --count, --data-dir and --data are for image runs; a node run shows curves, embeddings, graph or inputs"
        )
    trained = load_node_model(args.run)
    history = list(trained.state["history"])
    folder = run_folder(Path(args.run)) or trained.path.parent
    if args.kind == "all":  # every figure the run can draw (the graph drawing only for small graphs)
        from deepfit.graph.figures import save_run_figures

        print("\n".join(map(str, save_run_figures(folder, history, trained.model, trained.graph))))
        return 0
    figure = node_figure(args.kind, history, trained.model, trained.graph)
    print(save_figure(figure, folder / "plots" / f"{args.kind}.png"))
    return 0


def report_node(args: argparse.Namespace) -> int:
    from deepfit.graph import write_node_report

    print(write_node_report(args.run, out=args.out))
    return 0


# -- serve command --


def add_serve_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="RUN", help="run folder (its best.pt) or checkpoint file")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: a free one, announced on start)")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx"], help="PyTorch, or the verified ONNX export on onnxruntime")
    parser.add_argument("--device", default="cpu", help="torch backend: cpu (default), cuda, mps or auto")
    parser.add_argument("--workers", type=int, default=1, help="server processes, each with its own model (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of the model per process (default: the library's)")
    parser.add_argument("--max-batch", type=int, help="most images in one forward pass (default 32)")
    parser.add_argument("--max-wait-ms", type=float, help="longest wait for a batch to fill, ms (default 5)")
    parser.add_argument("--max-body-mb", type=float, default=10.0, help="largest request body, MiB; larger gets 413 (default 10)")
    parser.add_argument("--max-images", type=int, help="most images in one request; more gets 413 (default 64)")
    parser.add_argument("--max-rows", type=int, help="regression: most table rows in one request (default 10000)")
    parser.add_argument("--max-pixels", type=int, help="largest width x height an image may declare (default 40M)")
    parser.add_argument("--topk", type=int, help="classes listed per image when a request does not say (default 5)")
    parser.add_argument("--tta", choices=TTA_MODES, help="test-time augmentation, as in predict (default: the run's own train.tta)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (or set $DEEPFIT_API_KEY)")


# The serve flags of one kind of model, with their defaults: given for the other kind, refused.
IMAGE_SERVE_FLAGS = {"max_batch": 32, "max_wait_ms": 5.0, "max_images": 64, "max_pixels": 40_000_000, "topk": 5}
TABLE_SERVE_FLAGS = {"max_rows": 10_000}


def serve_flag_defaults(args: argparse.Namespace) -> None:
    """Refuse the flags the checkpoint's kind of model does not use, then fill in the defaults."""
    task = task_of(args.checkpoint) if Path(args.checkpoint).exists() else None  # a missing path: serve names it
    foreign = TABLE_SERVE_FLAGS if task == "image" else IMAGE_SERVE_FLAGS if task == "regression" else {}
    given = [f"--{name.replace('_', '-')}" for name in foreign if getattr(args, name) is not None]
    if given:
        kind, model = ("image", "a regression model") if task == "regression" else ("table", "an image classifier")
        raise UsageError(f"{', '.join(given)}: {kind}-serving option{'s' if len(given) > 1 else ''}; {args.checkpoint} holds {model}")
    for name, value in {**IMAGE_SERVE_FLAGS, **TABLE_SERVE_FLAGS}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def cmd_serve(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from deepfit.serve import ServeOptions, ServeSettings, serve

    serve_flag_defaults(args)

    options = ServeOptions(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_body_mb=args.max_body_mb,
        max_images=args.max_images, default_topk=args.topk, max_rows=args.max_rows, api_key=args.api_key,
    )  # fmt: skip
    settings = ServeSettings(
        args.checkpoint, host=args.host, port=args.port, backend=args.backend, device=args.device,
        workers=args.workers, threads=args.threads, max_pixels=args.max_pixels, tta=args.tta, options=options,
    )  # fmt: skip

    def announce(url: str) -> None:
        print(f"serving {args.checkpoint} ({args.backend}) on {url}  API docs: {url}docs  stop: Ctrl-C or SIGTERM", flush=True)

    serve(settings, announce=announce)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Sequence[str]], int]] = {
    "train": cmd_train,
    "models": cmd_models,
    "show": cmd_show,
    "report": cmd_report,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "predict": cmd_predict,
    "data": cmd_data,
    "lr-find": cmd_lr_find,
    "serve": cmd_serve,
}
ACCEPTS_OVERRIDES = {"train", "data", "models", "lr-find"}


def run(argv: Sequence[str], *, console: bool = False) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0 if not argv else 2
    extra = allow_named_model_class(extra, keep=args.command in ACCEPTS_OVERRIDES)
    if extra and args.command not in ACCEPTS_OVERRIDES:
        raise UsageError(f"unrecognised arguments: {' '.join(extra)}")
    args.argv = list(argv)  # train --devices N hands the same command line to each rank
    args.console = console  # the process ends with main(): start-up and exit may tune the collector
    return COMMANDS[args.command](args, extra)


def allow_named_model_class(extra: Sequence[str], *, keep: bool) -> list[str]:
    """`--model.class pkg.mod:Net` names the user's own model: deepfit may import it (never only
    because a checkpoint names it). Commands without config overrides take just this flag."""
    rest, items = [], list(extra)
    while items:
        flag = items.pop(0)
        if flag.startswith("--model.class="):
            items.insert(0, flag.partition("=")[2])
            flag = "--model.class"
        if flag == "--model.class" and items:
            from deepfit.models import allow_model_class  # torch loads only when a class is named

            value = items.pop(0)
            allow_model_class(value)
            rest += [flag, value] if keep else []
        else:
            rest.append(flag)
    return rest


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `deepfit` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:  # `deepfit` alone prints the help; `deepfit train` alone trains the embedded demo
        with warnings_as_lines(), early_interrupts():  # a Ctrl-C while starting is never lost
            return run(arguments, console=argv is None)
    except DeepfitError as err:
        from deepfit.launch import first_to_say

        if first_to_say(f"error: {err}"):  # --devices N: once, not from every rank
            print(f"deepfit: error: {err}", file=sys.stderr)
        print_resume_hint(err)
        return err.exit_code
    except BrokenPipeError:  # `deepfit predict ... | head`: the reader has gone, so stop quietly
        return quiet_broken_pipe()
    except OSError as err:
        if err.filename is None:  # not about a path the user can fix: a bug, shown whole
            raise
        reason = "a file is there, where a folder is needed" if isinstance(err, FileExistsError) else err.strerror or str(err)
        print(f"deepfit: error: {err.filename}: {reason}", file=sys.stderr)  # e.g. an --out that cannot be written
        print_resume_hint(err)
        return OS_ERROR_EXIT
    except NonFiniteError as err:
        report_stop(err)
        return NonFiniteError.exit_code
    except (StopRequested, KeyboardInterrupt) as err:
        if argv is None:  # the console script: a press while the interpreter shuts down printed a threading traceback
            ignore_further_signals()
        report_stop(err)
        return int(getattr(err, "exit_code", StopRequested.exit_code))  # 130 SIGINT, 143 SIGTERM
    finally:
        if argv is None:  # the console script (or python -m deepfit): the process exits next
            skip_collection_at_exit()


def report_stop(err: BaseException) -> None:
    """Why the run stopped, and the way back into it where there is one."""
    if not said_by_rank0(err):
        print(f"deepfit: stopped: {str(err) or 'interrupted'}", file=sys.stderr)
        print_resume_hint(err)


def said_by_rank0(err: BaseException) -> bool:
    """Under torchrun, a stop that every rank agreed on (a signal, a non-finite value) is printed by
    rank 0 alone: N copies of one line, written at once to one terminal, ran into each other.
    A rank's other errors are its own, and each rank prints them."""
    from deepfit import launch
    from deepfit.interrupts import SignalStop

    return isinstance(err, (NonFiniteError, SignalStop)) and launch.in_worker() and not launch.is_rank0()


def print_resume_hint(err: BaseException) -> None:
    """The way back into a run that stopped on a signal or a file-system failure (run_dir set)."""
    run_dir = getattr(err, "run_dir", None)
    if run_dir is not None:
        print(f"deepfit: resume with: deepfit train --resume {run_dir}", file=sys.stderr)


def skip_collection_at_exit() -> None:
    """Hide every object from the garbage collector before the interpreter shuts down: its
    collections at exit walked the heap that torch and torch._dynamo build, 1.1-1.4 s of every
    command on a 2-core machine. atexit handlers and reference-counted clean-up still run; only
    cyclic garbage is left to the operating system (deepfit closes its own files)."""
    import gc

    gc.freeze()


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """A warning is one line on stderr, `deepfit: warning: ...`, not Python's file:line header
    with a line of deepfit's source under it."""
    import warnings

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        kind = "" if category is UserWarning else f"{category.__name__}: "
        print(f"deepfit: warning: {kind}{message}", file=sys.stderr)

    shown = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


OS_ERROR_EXIT = 74  # EX_IOERR, as for a checkpoint that could not be saved: the system refused a path (no folder, no permission, disk full)
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what `cat` reports when its reader leaves


def quiet_broken_pipe() -> int:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise again (Python's
    documented recipe); no traceback, no message: the reader chose to stop reading."""
    import os

    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return BROKEN_PIPE_EXIT


def ignore_further_signals() -> None:
    """The process is on its way out after a stop: more Ctrl-C presses change nothing."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    raise SystemExit(main())
