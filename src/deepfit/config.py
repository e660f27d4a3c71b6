"""The typed run config: defaults in code < YAML file < CLI flags, validated, saved with every run."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from deepfit.errors import ConfigError

TtaMode = Literal["none", "flip", "shift", "flip-shift"]  # test-time augmentation: which copies of an image are averaged
TTA_MODES: tuple[str, ...] = typing.get_args(TtaMode)


@dataclass
class DataConfig:
    task: Literal["image", "regression", "node"] = "image"  # what is learned: image classes, a numeric target, graph node classes
    name: str = "digits"  # registered dataset, or a path to an image folder, .zip or .csv
    dir: str | None = None  # folder holding the dataset files (default: env var, then system dirs)
    download: bool = False  # let torchvision download the dataset when it is not found locally
    val_fraction: float = 0.1  # share of the training split held out for validation, 0..0.9
    batch_size: int = 128  # training images per optimizer step
    drop_last: bool = False  # train on full batches only: each epoch leaves out its last partial batch (reshuffled, so not the same images)
    eval_batch_size: int = 1024  # images per forward pass in evaluation (no gradients kept)
    augment: Literal["none", "crop", "flip-crop", "random-resized-crop"] = "none"  # per-batch; crop: shift only
    crop_pad: int | None = None  # pixels crop and flip-crop translate by, at most (default: 2 below 32 px, 4 from 32 px up)
    pad_mode: Literal["constant", "reflect", "replicate"] = "constant"  # fill of the border a crop uncovers (constant: black)
    flip: Literal["random", "alternate"] = "random"  # mirror by a coin per image each time, or alternate: one coin, then flipped each epoch
    image_size: int | None = None  # resize image folders to this side in pixels (default: most common)
    image_shape: str | None = None  # CxHxW of CSV pixel rows, e.g. 1x28x28 (default: square guess)
    channels: int | None = None  # convert images to this many channels, 1 or 3 (default: as found)
    skip_bad: bool = False  # train without unreadable images instead of stopping (list kept in run)
    pipeline: Literal["auto", "memory", "stream"] = "auto"  # in-memory uint8 tensor, or decoding per batch in DataLoader workers
    memory_budget_mb: int = 4096  # auto: an image folder/zip or a fit(data=Dataset) decoding to more MiB streams
    num_workers: int = 2  # DataLoader worker processes that decode for the streaming pipeline (0: in the main process)
    cache: bool = True  # keep decoded tensors on disk, keyed by the source's fingerprint
    cache_dir: str | None = None  # where decoded tensors are cached (default: ~/.cache/deepfit)
    # -- regression task (data.task regression) --
    target: str | None = None  # regression: the CSV column to predict (required for CSV files)
    features: list[str] = field(default_factory=list)  # regression: CSV feature columns (empty: every numeric column)
    categorical: Literal["ignore", "onehot"] = "ignore"  # regression: text columns left out (listed) or one-hot encoded
    drop_missing: bool = False  # regression: drop rows with a missing value (counted) instead of stopping
    test_fraction: float = 0.2  # regression: seeded share of the rows held out as the test split, 0.05..0.5
    standardize: bool = True  # regression: scale features and target by training-split mean/std (undone in reports)
    # -- node task (data.task node) --
    nodes: str | None = None  # node: node-table CSV (id,label,feature...) of a user graph whose edge-list CSV is data.name
    node_test_fraction: float = 0.2  # node: share of a CSV graph's labelled nodes held out for test (Cora/karate have fixed splits)
    # -- training tricks --
    mix: Literal["none", "mixup", "cutmix", "both"] = "none"  # blend training batches (both: either, per batch)
    mix_alpha: float = 0.2  # Beta(alpha, alpha) draws the mixing share per batch; larger mixes harder
    sampler: Literal["shuffle", "balanced"] = "shuffle"  # balanced: draw every class equally often (with replacement)


@dataclass
class ModelConfig:
    name: str = "cnn_bn"  # registered model (see `deepfit models`)
    hidden: list[int] = field(default_factory=lambda: [200])  # mlp hidden layer widths
    activation: Literal["relu", "sigmoid", "leaky_relu", "tanh", "gelu"] = "relu"  # mlp activation
    layer_norm: bool = False  # mlp: LayerNorm after each hidden linear layer
    dropout: float = 0.0  # mlp: dropout probability after each hidden layer
    weights: str | None = None  # pretrained weights: "imagenet", a state-dict file, or none
    freeze: Literal["none", "backbone"] = "none"  # "backbone": only the new head learns
    backbone_lr_scale: float = 0.1  # fine-tuning (weights or init_from set): backbone lr = optim.lr * this
    init_from: str | None = None  # start from the weights of an earlier run or checkpoint
    channels_last: Literal["auto", "on", "off"] = "auto"  # memory layout of conv activations
    compile: bool = False  # torch.compile the model for training (measured: slower on small CPU models)
    class_path: str | None = None  # your own nn.Module as 'module:Class', built with no arguments (flag: --model.class)


@dataclass
class OptimConfig:
    name: str = "adam"  # sgd, adam, adamw, rmsprop, adagrad, adadelta
    lr: float = 3e-3  # base (peak, with onecycle) learning rate; measured best for Adam + one-cycle
    momentum: float = 0.9  # sgd and rmsprop momentum
    nesterov: bool = False  # sgd: Nesterov momentum
    weight_decay: float = 0.0  # L2 penalty (decoupled for adamw)
    norm_lr_scale: float = 1.0  # lr multiplier for normalisation layers' parameters; their decay per step kept (airbench: 64)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw moment decay


@dataclass
class SchedConfig:
    name: str = "onecycle"  # none, step, multistep, exponential, cosine, plateau, onecycle, linear
    warmup_epochs: float = 0.0  # linear warm-up from lr/10 over this many epochs (0: off)
    step_size: int = 10  # step: epochs between decays
    milestones: list[int] = field(default_factory=lambda: [30, 60])  # multistep: decay epochs
    gamma: float = 0.1  # step/multistep/exponential: decay factor per decay
    min_lr: float = 0.0  # cosine: final learning rate
    max_lr: float | None = None  # onecycle: peak learning rate (default: optim.lr)
    pct_start: float = 0.25  # onecycle, linear: share of steps spent rising
    start_factor: float = 0.1  # linear: first lr as a share of the peak
    end_factor: float = 0.0  # linear: last lr as a share of the peak
    patience: int = 2  # plateau: epochs without improvement before decay
    factor: float = 0.1  # plateau: decay factor


@dataclass
class LossConfig:
    name: str = "cross_entropy"  # cross_entropy, nll, bce, mse
    label_smoothing: float = 0.0  # cross_entropy: share of target mass spread over all classes
    class_weights: str | None = None  # cross_entropy/nll: "balanced" (n_images / (n_classes * n_class)) or a file of weights


@dataclass
class TrainConfig:
    epochs: int = 20  # passes over the training split
    seed: int = 0  # seeds torch, numpy, python and the data order
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    out: str | None = None  # run folder (default: runs/<data>-<model>-<time>)
    checkpoint_every: int = 0  # also save last.pt every this many steps (0: at epoch ends only)
    keep_last: int = 1  # step checkpoints kept besides last.pt and best.pt
    monitor: str = "val_acc"  # metric deciding best.pt and early stopping (val_loss: lower wins)
    early_stop: int = 0  # stop after this many epochs without improvement (0: never)
    restore_best: bool = True  # end with best.pt's weights (the monitor's best): the final test line, evaluate, predict, export use them
    clip_grad: float = 0.0  # clip the gradient norm to this value (0: off)
    accumulate: int = 1  # optimizer step every this many batches
    precision: Literal["32", "bf16", "fp16", "auto"] = "32"  # autocast dtype (fp16: CUDA only; auto: bf16 where native)
    time_limit: str | None = None  # wall-time budget, e.g. 90s, 5m, 1h; ends with a checkpoint
    threads: int = 0  # torch intra-op threads (0: all cores)
    topk: int = 5  # k of the top-k accuracy metric
    progress: bool = True  # draw a progress bar per epoch
    tta: TtaMode = "none"  # final test score: mean logits of each image and its mirror, 1-px shifts or both
    deterministic: bool = False  # deterministic kernels: a killed-and-resumed CUDA run ends bit-identical to a straight one (CPU: always)
    cudnn_benchmark: bool = False  # CUDA: cuDNN times its conv kernels per input shape, keeps the fastest (not with deterministic)
    cuda_graphs: bool = False  # CUDA: each step replayed as a CUDA graph (the whole step with a fused optimizer, else the model)
    ema: float = 0.0  # decay of an exponential moving average of the weights, e.g. 0.999 (0: off); evaluated, saved and exported
    lookahead: int = 0  # every N optimizer steps pull the weights to a slow copy, airbench94's lookahead (it uses 5; 0: off)
    log: list[str] = field(default_factory=list)  # experiment trackers beside metrics.csv: tensorboard, mlflow
    log_every: int = 50  # tensorboard: train loss every this many steps
    mlflow_uri: str | None = None  # MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)
    sync_bn: bool = False  # with several ranks: BatchNorm statistics over the global batch (SyncBatchNorm)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


# Keyword shortcuts of fit(**overrides) and `deepfit train`'s top-level flags -> dotted keys.
SHORTCUTS = {
    "task": "data.task",
    "data_dir": "data.dir",
    "epochs": "train.epochs",
    "seed": "train.seed",
    "device": "train.device",
    "out": "train.out",
    "checkpoint_every": "train.checkpoint_every",
    "keep_last": "train.keep_last",
    "monitor": "train.monitor",
    "time_limit": "train.time_limit",
    "init_from": "model.init_from",
}


def config_from_overrides(config: Config | None = None, **overrides: Any) -> Config:
    """A copy of `config` (default: the CLI's defaults) with keyword overrides, checked as the CLI checks flags:
    a section and a dict (optim={"lr": 3e-3}), a section and a name (model="cnn_bn", data="fashion-mnist"),
    a flag's name (epochs=2, data_dir=..., out=...) or a dotted key (**{"train.clip_grad": 1.0})."""
    import copy

    result = copy.deepcopy(config) if config is not None else Config()
    for name, value in overrides.items():
        if name in SECTIONS and isinstance(value, dict):
            config_from_dict({name: value}, result)
        elif name in SECTIONS and name != "train":
            set_value(result, f"{name}.name", value)
        elif name in SHORTCUTS or "." in name:
            set_value(result, SHORTCUTS.get(name, name), value)
        else:
            raise unknown_key(name, f"fit() takes a config, the sections ({', '.join(SECTIONS)}), {', '.join(SHORTCUTS)} or dotted keys")
    return result


def config_from_dict(raw: dict[str, Any], base: Config | None = None) -> Config:
    """Apply a nested dict (from YAML or a checkpoint) over `base`; unknown keys are errors."""
    config = base if base is not None else Config()
    if not isinstance(raw, dict):
        raise ConfigError("config must be a mapping of sections (data, model, optim, ...)")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}; valid: {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        for key, value in values.items():
            set_value(config, f"{section}.{key}", value)
    return config


def load_config(path: str | Path, base: Config | None = None) -> Config:
    """Read a YAML config file over `base`."""
    if Path(path).is_dir():
        raise ConfigError(folder_config_message(Path(path)))
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(err)}") from None
    try:
        return config_from_dict(raw, base)
    except ConfigError as err:  # a bad key or value: which of the user's files holds it
        raise ConfigError(f"config file {path}: {err}") from None


def folder_config_message(path: Path) -> str:
    """--config given a folder: for a run's folder, the flags that continue it or train it again."""
    if (path / "config.yaml").is_file():
        return (
            f"config file {path} is a run's folder: continue it with --resume {path}, or train its config again"
            f" with --config {path / 'config.yaml'} --out NEW"
        )
    return f"config file {path} is a folder; --config takes a YAML file"


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line report as one line: 'line 2, column 1: expected ',' or ']', but got ...'."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(err).split())
    context = getattr(err, "context", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


class UnknownKeyError(ConfigError):
    """A config key no section has; `suggestion` is the closest valid dotted key, if any is close."""

    def __init__(self, message: str, *, key: str, suggestion: str | None) -> None:
        super().__init__(message)
        self.key, self.suggestion = key, suggestion


# Field names users bring from other libraries -> deepfit's field name, for "did you mean".
SYNONYMS = {
    "learning_rate": "lr",
    "bs": "batch_size",
    "batch": "batch_size",
    "wd": "weight_decay",
    "epoch": "epochs",
    "optimizer": "name",
    "scheduler": "name",
    "arch": "name",
    "dataset": "name",
    "workers": "num_workers",
    "lr_max": "max_lr",
    "pretrained": "weights",  # torchvision's old pretrained=True
}


# Values older configs and checkpoints hold, read as today's: train.tta was a bool (true: flips).
LEGACY_VALUES = {"train.tta": {"true": "flip", "false": "none"}}


def all_keys() -> list[str]:
    """Every dotted config key, 'data.task' .. 'train.tta', in declaration order."""
    defaults = Config()
    return [f"{section}.{f.name}" for section in SECTIONS for f in dataclasses.fields(getattr(defaults, section))]


def suggest_key(dotted: str) -> str | None:
    """The valid dotted key closest to `dotted` ('optim.learning_rate' -> 'optim.lr', 'lr' -> 'optim.lr')."""
    import difflib

    keys = all_keys()
    section, _, name = dotted.replace("-", "_").rpartition(".")
    name = SYNONYMS.get(name, name)
    same_field = [k for k in keys if k.rpartition(".")[2] == name and (not section or k.startswith(f"{section}."))]
    if same_field:
        return same_field[0]
    if section in SECTIONS:  # compare field names only: the shared section prefix would make everything look close
        keys = [k for k in keys if k.startswith(f"{section}.")]
    fields = difflib.get_close_matches(name, [k.rpartition(".")[2] for k in keys], n=1, cutoff=0.6)
    return next((k for k in keys if fields and k.endswith(f".{fields[0]}")), None)


def unknown_key(dotted: str, detail: str) -> UnknownKeyError:
    suggestion = suggest_key(dotted)
    hint = f"; did you mean {suggestion}?" if suggestion else ";"
    return UnknownKeyError(f"unknown config key '{dotted}'{hint} {detail}", key=dotted, suggestion=suggestion)


def set_value(config: Config, dotted: str, value: Any) -> None:
    """Set `section.field` (hyphens allowed) to `value`, coerced and checked against the field type."""
    section_name, _, key = dotted.replace("-", "_").partition(".")
    key = "class_path" if (section_name, key) == ("model", "class") else key  # `class` is a Python keyword
    if section_name not in SECTIONS or not key:
        raise unknown_key(dotted, f"keys look like section.field, sections: {', '.join(SECTIONS)}")
    section = getattr(config, section_name)
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise unknown_key(dotted, "valid: " + ", ".join(f"{section_name}.{k}" for k in hints))
    value = LEGACY_VALUES.get(f"{section_name}.{key}", {}).get(str(value).lower(), value)
    setattr(section, key, coerce(value, hints[key], f"{section_name}.{key}"))


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))
        if is_none and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return coerce(value, inner[0], key)
    if origin is Literal:
        allowed = [str(a) for a in typing.get_args(hint)]
        if str(value) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
        return str(value)
    if origin is list:
        return coerce_list(value, typing.get_args(hint)[0], key)
    return coerce_scalar(value, hint, key)


def coerce_list(value: Any, item: Any, key: str) -> list[Any]:
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list; got {value!r}")
    return [coerce_scalar(v, item, key) for v in value]


def coerce_scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is bool:
        return coerce_bool(value, key)
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        try:
            number = float(value)
            if hint is int:
                if number != int(number):
                    raise ValueError
                return int(number)
            return number
        except (TypeError, ValueError, OverflowError):
            kind = "an integer" if hint is int else "a number"
            raise ConfigError(f"{key} must be {kind}; got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string; got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {hint}")


def coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"{key} must be true or false; got {value!r}")


def validate(config: Config) -> None:
    """Check ranges that types alone cannot express."""
    checks = [
        (0.0 <= config.data.val_fraction <= 0.9, "data.val_fraction must be in 0..0.9"),
        (config.data.batch_size > 0, "data.batch_size must be positive"),
        (config.data.eval_batch_size > 0, "data.eval_batch_size must be positive"),
        (config.optim.lr > 0, "optim.lr must be positive"),
        (config.optim.norm_lr_scale > 0, "optim.norm_lr_scale must be positive"),
        (config.data.crop_pad is None or config.data.crop_pad >= 0, "data.crop_pad must be 0 or more pixels"),
        (config.train.epochs > 0, "train.epochs must be positive"),
        (config.train.accumulate > 0, "train.accumulate must be positive"),
        (config.train.checkpoint_every >= 0, "train.checkpoint_every must be 0 or positive"),
        (config.train.keep_last >= 1, "train.keep_last must be at least 1"),
        (0.0 <= config.loss.label_smoothing < 1.0, "loss.label_smoothing must be in [0, 1)"),
        (0.0 <= config.model.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (config.train.topk >= 1, "train.topk must be at least 1"),
        (0.0 <= config.train.ema < 1.0, "train.ema must be in [0, 1): the decay per step, e.g. 0.999 (0: off)"),
        (config.train.lookahead >= 0, "train.lookahead must be 0 (off) or a number of optimizer steps, e.g. 5"),
        (config.train.log_every >= 1, "train.log_every must be at least 1"),
        (config.train.threads >= 0, "train.threads must be 0 (all cores) or a number of threads"),
        (config.train.early_stop >= 0, "train.early_stop must be 0 (never) or a number of epochs"),
        (config.train.clip_grad >= 0, "train.clip_grad must be 0 (off) or a positive gradient norm"),
        (config.data.num_workers >= 0, "data.num_workers must be 0 (decode in the main process) or a number of processes"),
        (config.data.memory_budget_mb >= 0, "data.memory_budget_mb must be 0 or more MiB"),
        (0.0 < config.data.node_test_fraction < 1.0, "data.node_test_fraction must be between 0 and 1"),
        (config.optim.weight_decay >= 0, "optim.weight_decay must be 0 or positive"),
        (0.0 <= config.optim.momentum < 1.0, "optim.momentum must be in [0, 1)"),
        (
            len(config.optim.betas) == 2 and all(0.0 <= b < 1.0 for b in config.optim.betas),
            f"optim.betas must be two numbers in [0, 1), e.g. 0.9,0.999; got {','.join(map(str, config.optim.betas))}",
        ),
        (config.sched.max_lr is None or config.sched.max_lr > 0, "sched.max_lr must be positive"),
        (config.sched.min_lr >= 0, "sched.min_lr must be 0 or positive"),
        (config.sched.warmup_epochs >= 0, "sched.warmup_epochs must be 0 (off) or more"),
        (config.sched.step_size >= 1, "sched.step_size must be at least 1 epoch"),
        (all(m >= 1 for m in config.sched.milestones), "sched.milestones must be epochs from 1 on"),
        (config.sched.gamma > 0, "sched.gamma must be positive"),
        (0.0 <= config.sched.pct_start <= 1.0, "sched.pct_start must be in 0..1"),
        (config.sched.start_factor >= 0 and config.sched.end_factor >= 0, "sched.start_factor and sched.end_factor must be 0 or more"),
        (config.sched.patience >= 0, "sched.patience must be 0 or more epochs"),
        (0.0 < config.sched.factor < 1.0, "sched.factor must be between 0 and 1"),
        (config.data.mix_alpha > 0, "data.mix_alpha must be positive"),
        (
            config.data.mix == "none" or config.loss.name == "cross_entropy",
            "data.mix needs loss.name cross_entropy (mixed targets are class shares)",
        ),
        (
            set(config.train.log) <= {"tensorboard", "mlflow"},
            f"train.log takes tensorboard, mlflow or both; got {','.join(config.train.log)}",
        ),
        (0.05 <= config.data.test_fraction <= 0.5, "data.test_fraction must be in 0.05..0.5"),
        (
            not (config.train.cudnn_benchmark and config.train.deterministic),
            "train.cudnn_benchmark picks cuDNN kernels by timing them, which train.deterministic rules out; turn one off",
        ),
        (
            not (config.train.cuda_graphs and config.train.accumulate > 1),
            "train.cuda_graphs replays into the same gradient buffers every batch, so it cannot accumulate them (train.accumulate > 1); turn one off",
        ),
        (
            not (config.train.cuda_graphs and config.model.compile),
            "train.cuda_graphs captures the model's own forward pass, which model.compile replaces; turn one off",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if config.train.time_limit is not None:
        parse_duration(config.train.time_limit)
    require_class_path(config.model.class_path)
    refuse_unused(config, infer_task(config.data))


def require_class_path(class_path: str | None) -> None:
    """model.class as 'module:Class' (how deepfit records it); a dotted path is refused with its colon form."""
    if class_path is not None and ":" not in class_path.strip(":"):
        module, _, name = class_path.rpartition(".")
        example = f"{module}:{name}" if module and name else "my_models:Net"
        raise ConfigError(f"model.class takes module:Class, e.g. --model.class {example}; got {class_path!r}")


IMAGE_ONLY = (
    "data.augment", "data.drop_last", "data.crop_pad", "data.pad_mode", "data.flip", "optim.norm_lr_scale", "data.image_size", "data.image_shape",
    "data.channels", "data.skip_bad", "data.pipeline", "data.memory_budget_mb", "data.num_workers", "data.cache", "data.mix", "data.mix_alpha", "data.sampler", "model.weights",
    "model.freeze", "model.backbone_lr_scale", "model.init_from", "model.channels_last", "model.compile", "loss.class_weights",
    "train.topk", "train.tta", "train.ema", "train.lookahead", "train.sync_bn", "train.keep_last", "train.log_every", "train.cudnn_benchmark",
    "train.cuda_graphs",
)  # fmt: skip
# The options that only some tasks read. One set away from its default for another task stops the
# run in one line rather than being silently ignored (`--train.ema` on a regression run, say).
OPTION_TASKS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(IMAGE_ONLY, ("image",)),
    **dict.fromkeys(("data.target", "data.features", "data.categorical", "data.drop_missing", "data.test_fraction", "data.standardize"), ("regression",)),
    **dict.fromkeys(("data.nodes", "data.node_test_fraction"), ("node",)),
    **dict.fromkeys(("data.batch_size", "data.eval_batch_size", "train.accumulate", "train.precision"), ("image", "regression")),
    "loss.label_smoothing": ("image", "node"),
}  # fmt: skip


def refuse_unused(config: Config, task: str) -> None:
    """ConfigError naming every option set for `task` that its runs do not read."""
    blank = Config()
    unused = []
    for key, tasks in OPTION_TASKS.items():
        section, field = key.split(".")
        if task not in tasks and getattr(getattr(config, section), field) != getattr(getattr(blank, section), field):
            unused.append(f"--{key.replace('_', '-')} ({'/'.join(tasks)} runs)")
    if unused:
        raise ConfigError(
            f"{', '.join(unused)}: not used by {'an' if task == 'image' else 'a'} {task} run; leave {'it' if len(unused) == 1 else 'them'} out"
        )


# What --resume restores, so what a resumed run cannot change: the data and its split, the steps an
# epoch takes (the saved position and a per-step schedule count them), the model, and the optimizer
# and schedule whose saved state overwrites their settings (a new lr or weight decay was silently
# the old one; a new optimizer, or a new batch size under one-cycle, failed with a traceback). A
# section name stands for all its keys. Everything else (epochs, tricks, precision, checkpointing,
# the device, ...) applies to the rest of the run.
RESUME_FIXED = (
    "data.task", "data.name", "data.val_fraction", "data.batch_size", "data.drop_last", "train.accumulate",
    "data.image_size", "data.image_shape", "data.channels", "data.target",
    "data.features", "data.categorical", "data.drop_missing", "data.test_fraction", "data.standardize", "data.nodes",
    "data.node_test_fraction", "model.name", "model.hidden", "model.activation", "model.layer_norm", "model.weights",
    "model.freeze", "model.backbone_lr_scale", "model.init_from", "model.class_path", "optim", "sched", "train.seed",
)  # fmt: skip


def resume_changes(saved: Config, config: Config) -> list[str]:
    """'key (old -> new)' for each RESUME_FIXED key that `config` sets otherwise than the run it resumes.
    A data path that no longer exists may be given anew (the data moved); the weights' shapes are still checked."""
    changes = []
    for name in RESUME_FIXED:
        keys = [name] if "." in name else [f"{name}.{f.name}" for f in dataclasses.fields(getattr(saved, name))]
        for key in keys:
            section, field = key.split(".")
            old, new = getattr(getattr(saved, section), field), getattr(getattr(config, section), field)
            if old != new and not (key == "data.name" and moved(str(old), str(new))):
                changes.append(f"{key} ({old} -> {new})")
    return changes


def moved(old: str, new: str) -> bool:
    """Whether data.name `new` may stand for `old`: the same path written otherwise, or, where the
    path a run saved (absolute) is gone, any other (the data moved)."""
    before = Path(old).expanduser()
    if before.exists():
        return before.resolve() == Path(new).expanduser().resolve()
    return before.is_absolute()


# Datasets whose name alone says the task: `--data line` needs no `--task regression`.
TASK_BY_DATA = {"line": "regression", "diabetes": "regression", "cora": "node", "karate": "node"}


def infer_task(data: DataConfig) -> str:
    """The task data.task names, or, while it is the default, the one --data (or --target, or
    --data.nodes) implies."""
    if data.task != "image":
        return data.task
    if data.target:
        return "regression"
    return TASK_BY_DATA.get(data.name, "node" if data.nodes else "image")


def parse_duration(text: str) -> float:
    """'90', '90s', '5m', '1.5h' -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    raw = text.strip().lower()
    scale = units.get(raw[-1:])
    number = raw[:-1] if scale is not None else raw
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise ConfigError(f"train.time_limit must look like 90s, 5m or 1h; got {text!r}") from None
    if seconds <= 0:
        raise ConfigError(f"train.time_limit must be positive; got {text!r}")
    return seconds
