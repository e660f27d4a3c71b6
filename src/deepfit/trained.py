"""A trained model rebuilt from nothing but its checkpoint: the architecture and weights, the
class names and the training preprocessing (input shape, normalisation). Shared by evaluation,
predict and export, which sit side by side in the layers and may not import each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepfit.checkpoint import checkpoint_task, load_checkpoint, load_model_state
from deepfit.config import TTA_MODES, Config, config_from_dict
from deepfit.data import BatchLoader, DataBundle, ImageSet
from deepfit.errors import CheckpointError, ConfigError
from deepfit.models import build_model, copy_matching_weights
from deepfit.runtime import keep_freed_memory_on


@dataclass
class TrainedModel:
    """A model in eval mode plus everything needed to feed it images the way it was trained."""

    path: Path  # the checkpoint file that was read
    model: nn.Module
    config: Config  # the run's resolved config, as saved
    classes: list[str]
    input_shape: tuple[int, int, int]  # (C, H, W) the model expects
    mean: tuple[float, ...]  # per-channel, pixels on the 0..1 scale
    std: tuple[float, ...]
    flip_ok: bool  # a mirrored image keeps its class (test-time flip allowed)
    device: torch.device
    channels_last: bool = False  # model and batches in channels-last memory layout (conv models)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def tta_mode(self, tta: str | None = None) -> str:
        """The test-time augmentation to apply: by default the run's own train.tta (the one its
        final test line used, so evaluate, predict and serve agree with it); flips only where the
        checkpoint says a mirrored image keeps its class."""
        if tta is None:
            return self.config.train.tta
        if tta not in TTA_MODES:
            raise ConfigError(f"unknown --tta {tta!r}; valid: {', '.join(TTA_MODES)}")
        if "flip" in tta and not self.flip_ok:
            raise ConfigError(
                f"--tta {tta} is not allowed for {self.config.data.name}: a mirrored image may change class (flip_ok is false in {self.path})"
            )
        return tta

    def batches(self, images: torch.Tensor, labels: torch.Tensor | None = None, *, batch_size: int = 256) -> BatchLoader:
        """uint8 (N, C, H, W) -> normalised float batches on the model's device, through the same
        BatchLoader training used (bit-identical preprocessing); labels default to zeros."""
        if labels is None:
            labels = torch.zeros(images.shape[0], dtype=torch.long)
        return BatchLoader(
            ImageSet(images, labels),
            batch_size=batch_size,
            mean=self.mean,
            std=self.std,
            device=self.device,
            channels_last=self.channels_last,
        )


def load_trained_model(
    path: str | Path, *, device: torch.device | None = None, channels_last: bool | None = None, model: nn.Module | None = None
) -> TrainedModel:
    """Rebuild the model a checkpoint (or a run folder: best.pt, else last.pt) describes, or load
    its weights into `model` (your own nn.Module, for a run trained with one)."""
    return load_into(path, device=device, channels_last=channels_last, given=model)


def require_image_task(state: dict[str, Any], path: Path) -> None:
    """A CheckpointError unless the checkpoint `path` stands for holds an image classifier (the
    other tasks' commands dispatch before the image code; the Python API reaches it directly)."""
    if (task := checkpoint_task(state)) != "image":
        file = path if path.is_file() else resolved_file(path)
        raise CheckpointError(
            f"{file} holds a {task} model, not an image classifier; deepfit evaluate, predict, export, show and report take {task} runs"
        )


def load_into(path: str | Path, *, device: torch.device | None, channels_last: bool | None, given: nn.Module | None) -> TrainedModel:
    """Rebuild the model a checkpoint (or a run folder: best.pt, else last.pt) describes.
    Every problem with the file is a CheckpointError: missing, empty, corrupt, unsafe, another
    format version, a config or architecture this deepfit cannot build, weights that do not fit."""
    path = Path(path)
    state = load_checkpoint(path)
    file = path if path.is_file() else resolved_file(path)
    require_image_task(state, path)
    try:
        config = config_from_dict(state["config"])
        architecture = config_from_dict(state["config"]).model
        architecture.weights = None  # the checkpoint holds the weights: never fetch pretrained ones
        architecture.init_from = None
        input_shape = shape_of(state["input_shape"])
        classes = [str(name) for name in state["classes"]]
        model = given if given is not None else build_model(architecture, input_shape=input_shape, num_classes=len(classes))
    except (ConfigError, TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{file}: cannot rebuild its model: {err}") from None
    load_model_state(model, state["model"], file)
    target = device if device is not None else torch.device("cpu")
    keep_freed_memory_on(target)  # evaluate, predict and serve batch through it as training does
    model = model.to(target).eval()
    layout = use_channels_last(config.model.channels_last, model) if channels_last is None else channels_last
    if layout:
        model = model.to(memory_format=torch.channels_last)
    mean = tuple(float(m) for m in state["mean"])
    std = tuple(float(s) for s in state["std"])
    if len(mean) != input_shape[0] or len(std) != input_shape[0]:
        raise CheckpointError(f"{file}: normalisation stats have {len(mean)} channels, the input has {input_shape[0]}")
    return TrainedModel(file, model, config, classes, input_shape, mean, std, bool(state.get("flip_ok", False)), target, layout)


@dataclass
class InitReport:
    """What --init-from did: the checkpoint read and the model tensors copied or left as built."""

    path: Path  # the checkpoint file read (a run folder stands for best.pt, else last.pt)
    copied: list[str]  # state-dict names copied (same name and shape)
    skipped: list[str]  # "<name>: <reason>" for the model's tensors left as built
    unused: list[str]  # checkpoint tensors the model has no place for


def init_weights(model: nn.Module, source: str | Path, *, classes: list[str] | None = None) -> InitReport:
    """Start `model` from the matching weights of an earlier run or checkpoint (read safely,
    weights_only=True); the rest keeps its initialisation. When `classes` (the new data's) differ
    from the checkpoint's, the head starts fresh even if its shape fits. No match is an error."""
    path = Path(source)
    state = load_checkpoint(path)
    file = path if path.is_file() else resolved_file(path)
    other_classes = classes is not None and [str(c) for c in state["classes"]] != [str(c) for c in classes]
    result = copy_matching_weights(model, state["model"], new_head=other_classes)
    if not result.copied:
        raise CheckpointError(f"--init-from {file}: no tensor of it matches this model by name and shape")
    return InitReport(file, result.copied, result.skipped, result.unused)


INIT_IMAGES = 5000  # training images a model's own data-dependent init sees (airbench's number)


def init_from_data(model: nn.Module, bundle: DataBundle) -> bool:
    """Call `model.init_from_data(x)` when the model defines it (a whitened stem, for one) with the
    first INIT_IMAGES training images, normalised, un-augmented, on the CPU: (N, C, H, W) float32.
    Only in-memory training data; returns whether it ran."""
    method = getattr(model, "init_from_data", None)
    if method is None or not isinstance(bundle.train, ImageSet):
        return False
    loader = BatchLoader(bundle.train, batch_size=INIT_IMAGES, mean=bundle.mean, std=bundle.std, device=torch.device("cpu"))
    x, _ = next(iter(loader))
    method(x)
    return True


def on_train_epoch_start(model: nn.Module, epoch: int) -> bool:
    """Call `model.on_train_epoch_start(epoch)` (0-based) when the model defines it: a model's own
    per-epoch change, such as airbench_whiten's stem bias that stops learning after 3 epochs.
    A hook that turns parameters' requires_grad off runs under DDP too: with the hook defined,
    distributed.wrap_model lets DDP find unused parameters. Returns whether it ran."""
    method = getattr(model, "on_train_epoch_start", None)
    if method is None:
        return False
    method(epoch)
    return True


def use_channels_last(setting: str, model: nn.Module) -> bool:
    """'auto': on for convolutional models (measured 1.1-1.5x faster on CPU), off otherwise."""
    if setting != "auto":
        return setting == "on"
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def place_model(model: nn.Module, setting: str, device: torch.device) -> tuple[nn.Module, bool]:
    """The model on `device`, channels-last when `setting` says so; and whether it is."""
    channels_last = use_channels_last(setting, model)
    model = model.to(device)
    return (model.to(memory_format=torch.channels_last), True) if channels_last else (model, False)


def resolved_file(run_dir: Path) -> Path:
    """The file load_checkpoint read for a run folder."""
    best = run_dir / "checkpoints" / "best.pt"
    return best if best.is_file() else run_dir / "checkpoints" / "last.pt"


def shape_of(value: object) -> tuple[int, int, int]:
    """[C, H, W] from a checkpoint -> (C, H, W) of positive ints."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"input_shape must be [C, H, W], got {value!r}")
    c, h, w = (int(v) for v in value)
    if min(c, h, w) <= 0:
        raise ValueError(f"input_shape must be positive, got {value!r}")
    return c, h, w


def run_folder(path: Path) -> Path | None:
    """The run folder a checkpoint belongs to (runs/<name>/checkpoints/x.pt), or None for a bare file."""
    if path.is_dir():
        return path
    parent = path.parent
    if parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file():
        return parent.parent
    return None
