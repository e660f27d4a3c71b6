"""The parts fit() builds from the config before training: the network (started and frozen as
asked), optimizer, schedule, loss scaler and class weights; each refusal of a setting is one line."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from deepfit.config import Config
from deepfit.cudagraphs import GraphedForward, GraphedStep, kept_state, steps_can_be_graphed
from deepfit.data import DataBundle
from deepfit.data.balance import build_class_weights
from deepfit.errors import ConfigError, DataError, first_line
from deepfit.models import build_model, class_path_of, freeze_backbone, parameter_groups, training_bytes
from deepfit.optim import ScheduleSpan, build_optimizer, resolve_schedule, schedule_from_config
from deepfit.runtime import autocast_dtype, device_memory
from deepfit.trained import InitReport, init_from_data, init_weights

SKIPPED_FILE = "skipped_files.csv"  # the bad files data.skip_bad left out: path, reason


def save_skipped(skipped: list[tuple[str, str]], path: Path) -> None:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows(skipped)


def class_weights(config: Config, bundle: DataBundle, device: torch.device) -> torch.Tensor | None:
    """loss.class_weights (K,) on the training device, from the training split's counts or a file."""
    spec = config.loss.class_weights
    return build_class_weights(spec, bundle.train.labels, bundle.classes).to(device) if spec else None


def build_network(config: Config, bundle: DataBundle, model: nn.Module | None, *, fresh: bool) -> tuple[nn.Module, InitReport | None]:
    """The given or registered model, started from --init-from and its backbone frozen when asked.
    A resumed run builds without pretrained weights or --init-from: its checkpoint holds the weights."""
    if model is None:
        architecture = config.model if fresh else dataclasses.replace(config.model, weights=None, init_from=None)
        model = build_model(architecture, input_shape=bundle.input_shape, num_classes=bundle.num_classes)
    if fresh and not config.model.init_from and not config.model.weights:
        init_from_data(model, bundle)  # the model's own data-dependent init (a whitened stem), if it has one
    init = init_weights(model, config.model.init_from, classes=bundle.classes) if fresh and config.model.init_from else None
    if config.model.freeze == "backbone":
        freeze_backbone(model)  # before the optimizer: frozen parameters never reach it
    return model, init


def require_logits(model: nn.Module, bundle: DataBundle, device: torch.device, *, channels_last: bool) -> None:
    """Your own model (fit(model=...), --model.class): stop in one line, before the run folder
    exists, when it has nothing to train or does not map a batch of the data's images to one score
    per class. It is tried on a batch of 2 blank images in evaluation mode, as validation runs it:
    no BatchNorm statistics move, and a forward that counts its training calls is not called in
    training (buffers and the random state are put back all the same). Registered models are built
    for the data's shape and classes."""
    name, shape = class_path_of(model), "x".join(map(str, bundle.input_shape))
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"your model {name} has no trainable parameters")
    x = torch.zeros(2, *bundle.input_shape, device=device)
    training = model.training
    try:
        with kept_state(model, device), torch.no_grad():
            out = model.eval()(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    except Exception as err:  # the user's code: whatever it raises, it does not take these images
        raise ConfigError(
            f"your model {name} fails on a batch of {shape} images (the data's shape): {first_line(err, named=True)}"
        ) from None
    finally:
        model.train(training)
    expected = (2, bundle.num_classes)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"your model {name} returns a {type(out).__name__}; deepfit trains on a tensor of logits {expected}: return it alone"
        )
    if tuple(out.shape) != expected:
        raise ConfigError(
            f"your model {name} returns shape {tuple(out.shape)} for a batch of 2 {shape} images; deepfit needs {expected}:"
            f" one score for each of the data's {bundle.num_classes} classes"
        )


def require_saved_classes(saved: dict[str, Any] | None, bundle: DataBundle, run_dir: str | Path | None) -> None:
    """A resumed run's data (`saved`: its checkpoint; None for a new run) has the classes it started
    with, in their order: a class folder added since failed later on a size mismatch of the last
    layer, and one renamed so that the order changed went on training each output as another class."""
    if saved is not None and list(saved["classes"]) != list(bundle.classes):
        raise DataError(
            f"--resume {run_dir}: its data {bundle.source} now has the classes {', '.join(bundle.classes[:10])}; the run"
            f" started with {', '.join(saved['classes'][:10])}. Restore them, or start a new run from its weights with --init-from {run_dir}"
        )


def require_callbacks(**callbacks: object) -> None:
    """fit()'s progress, on_epoch and on_start are functions (or None; progress also False): a
    string or True failed as 'object is not callable' at the first epoch, after the run folder."""
    for name, value in callbacks.items():
        if value is not None and value is not False and not callable(value):
            raise ConfigError(f"fit({name}=...) takes a function or None, not {type(value).__name__} {value!r}")


def require_model_parameters(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """fit(optimizer=...) must step the model's own parameters: one built on another module's
    (a second `Net()`, say) would leave the trained model as it started, without a word."""
    own = {id(p) for p in model.parameters()}
    given = [p for group in optimizer.param_groups for p in group["params"]]
    if given and not any(id(p) in own for p in given):
        raise ConfigError(
            f"fit(optimizer=...) steps {len(given)} parameter tensor(s) of another module, none of the model's:"
            " build it on the parameters of the model passed as fit(model=...)"
        )


PROBE_ABOVE = 3 * 96 * 96  # input values per image above which training's memory is estimated first (MNIST, CIFAR: not)


def require_training_memory(config: Config, bundle: DataBundle, device: torch.device) -> None:
    """A registered model on large images: stop in one line when training would need more than
    the device's memory (an image size that makes the classifier's first layer tens of GB, say),
    rather than be killed by the operating system partway through building it."""
    c, h, w = bundle.input_shape
    if c * h * w <= PROBE_ABOVE or not (have := device_memory(device)):
        return
    need = training_bytes(config.model, bundle.input_shape, bundle.num_classes, config.data.batch_size)
    if need is not None and need > have:
        where = "the GPU has" if device.type == "cuda" else "this machine has"
        raise ConfigError(
            f"{config.model.name} on {c}x{h}x{w} images in batches of {config.data.batch_size} needs about {need / 1e9:.1f} GB to train"
            f" (weights, gradients, optimizer state, activations), more than the {have / 1e9:.1f} GB {where}:"
            " lower --data.image-size or --data.batch-size"
        )


def make_optimizer(config: Config, net: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """config.optim over the model's parameter groups (head only when frozen; backbone at a lower lr when fine-tuning)."""
    o = config.optim
    groups = scale_norm_lr(parameter_groups(net, lr=o.lr, config=config.model), net, o.norm_lr_scale, o.weight_decay)
    with config_choice(f"optim.name {o.name}"):
        return build_optimizer(
            o.name, groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
            betas=(o.betas[0], o.betas[1]), device=device,
        )  # fmt: skip


NORM_LAYERS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
)  # fmt: skip


def scale_norm_lr(groups: list[dict[str, Any]], net: nn.Module, scale: float, weight_decay: float) -> list[dict[str, Any]]:
    """optim.norm_lr_scale: the parameters of normalisation layers (BatchNorm shifts and scales,
    LayerNorm's, ...) in groups of their own at lr * scale and weight_decay / scale, so their decay
    per step (lr * decay) is the other weights' (airbench's bias_scaler, which it gives BatchNorm
    biases). The other weights' groups come first (the logged lr)."""
    if scale == 1.0:
        return groups
    norms = {id(p) for m in net.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    others = [{**g, "params": [p for p in g["params"] if id(p) not in norms]} for g in groups]
    scaled = [
        {**g, "params": [p for p in g["params"] if id(p) in norms], "lr": g["lr"] * scale, "weight_decay": weight_decay / scale, "name": f"{g['name']}-norm"}
        for g in groups
    ]  # fmt: skip
    return [g for g in others + scaled if g["params"]]


@contextlib.contextmanager
def config_choice(what: str) -> Iterator[None]:
    """torch's ValueError for a setting it rejects (a negative momentum, betas out of range, a
    schedule the optimizer cannot follow) becomes one line naming the config choice."""
    try:
        yield
    except ValueError as err:
        raise ConfigError(f"{what}: {first_line(err)}") from None


def build_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; its current scale and growth count are saved with the run."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def warn_unsafe_tta(mode: str, bundle: DataBundle) -> None:
    """Test-time flips where a mirror image may change class are kept as asked, with a warning."""
    if "flip" in mode:
        warn_unsafe_flips(f"train.tta {mode} flips test images", bundle)


def augment_for(preset: str, bundle: DataBundle) -> str:
    """The augmentation preset as asked; flips where a mirror image may change class warn."""
    if preset not in ("none", "crop"):
        warn_unsafe_flips(f"data.augment {preset} flips images", bundle)
    return preset


def warn_unsafe_flips(what: str, bundle: DataBundle) -> None:
    if not bundle.flip_ok:
        import warnings

        warnings.warn(f"{what}, but a mirrored {bundle.source} image may change class; flips stay on as asked", stacklevel=3)


def choose_schedule(config: Config, optimizer: torch.optim.Optimizer, given: Any, steps_per_epoch: int) -> tuple[Any, str]:
    """The API's scheduler (stepped per epoch unless Schedule(interval="step")), else config.sched (per step)."""
    if given is not None:
        return resolve_schedule(given, optimizer)
    return make_scheduler(config, optimizer, steps_per_epoch), "step"


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    s = config.sched
    mode: Literal["min", "max"] = "min" if config.train.monitor.endswith("loss") else "max"
    with config_choice(f"sched.name {s.name} with optim.name {config.optim.name}"):
        return schedule_from_config(s, optimizer, span=ScheduleSpan(steps_per_epoch, config.train.epochs), mode=mode)


def cuda_graphs(
    config: Config, model: nn.Module, device: torch.device, *, ranks: int, optimizer: torch.optim.Optimizer, scheduler: Any
) -> GraphedForward | GraphedStep | None:
    """train.cuda_graphs on a CUDA device: the whole step as one graph where it can be recorded
    (cudagraphs.steps_can_be_graphed), else (or once that failed) the model's forward and
    backward; no effect elsewhere."""
    if not config.train.cuda_graphs or device.type != "cuda":
        return None
    if ranks > 1:
        raise ConfigError(
            "train.cuda_graphs does not combine with several torchrun processes: DistributedDataParallel's gradient hooks run outside the graphs; turn it off"
        )
    model_graphs = GraphedForward(model, autocast_dtype=autocast_dtype(config.train.precision, device))
    if steps_can_be_graphed(optimizer, scheduler):
        return GraphedStep(model, optimizer, fallback=model_graphs)
    return model_graphs
