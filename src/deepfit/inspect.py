"""Looking inside a trained run: rebuild its model, name its layers, capture a layer's output
with a forward hook (removed afterwards), Grad-CAM, and choose the images each figure of
`deepfit show` draws. Returns tensors and Figures; never prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from deepfit import plots
from deepfit.checkpoint import load_checkpoint, load_model_state
from deepfit.config import Config, config_from_dict
from deepfit.data import BatchLoader, ImageSet, build_data, load_images
from deepfit.engine import predict_logits
from deepfit.errors import ConfigError, DataError, DeepfitError
from deepfit.history import LR_FILE, read_lr_csv, read_metrics_csv
from deepfit.metrics import confusion_matrix
from deepfit.models import build_model
from deepfit.trained import require_image_task

FIGURE_KINDS = ("curves", "samples", "predictions", "confusion", "mistakes", "filters", "features", "gradcam")


class InspectError(DeepfitError):
    """A layer, figure kind or image that the run cannot show."""


@dataclass
class LoadedRun:
    """A run rebuilt from its checkpoint: the model (eval mode, CPU) and how its images are prepared.
    A run of the user's own nn.Module whose class was not named keeps why in `built`: figures that
    need no model (curves, samples) are still drawn, the others say how to supply it."""

    run_dir: Path
    built: nn.Module | DeepfitError  # the model, or why it cannot be rebuilt here
    config: Config
    classes: list[str]
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    cache: dict[str, object] = field(default_factory=dict)  # the rebuilt data and predictions, made once

    @property
    def model(self) -> nn.Module:
        if isinstance(self.built, DeepfitError):
            raise type(self.built)(str(self.built))
        return self.built

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float, normalised with the run's training statistics."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def eval_set(self) -> ImageSet:
        """The run's test split (its validation split when there is no test split)."""
        if "eval_set" not in self.cache:
            bundle = build_data(self.config.data, seed=self.config.train.seed)
            if list(bundle.classes) != list(self.classes):  # a class folder added or renamed since training
                raise DataError(
                    f"{self.config.data.name} has the classes {', '.join(bundle.classes[:10])}; the run was trained on"
                    f" {', '.join(self.classes[:10])}: its figures need the data it was trained on"
                )
            split = bundle.test if bundle.test is not None else bundle.val
            if split is None or len(split) == 0:
                raise DataError(f"{self.config.data.name} has no test or validation images to show")
            self.cache["train_set"] = bundle.train
            self.cache["eval_set"] = split
            self.cache["eval_split"] = "test" if split is bundle.test else "val"
        value = self.cache["eval_set"]
        assert isinstance(value, ImageSet)
        return value

    def eval_split(self) -> str:
        """'test', or 'val' when the run's data has no test split: the split eval_set() shows."""
        self.eval_set()
        return str(self.cache["eval_split"])

    def eval_logits(self) -> torch.Tensor:
        """Logits (N, K) of the model on eval_set(), computed once."""
        if "eval_logits" not in self.cache:
            images = self.eval_set()
            batches = BatchLoader(images, batch_size=512, mean=self.mean, std=self.std, device=torch.device("cpu"))
            self.cache["eval_logits"] = predict_logits(self.model, batches)[0]
        value = self.cache["eval_logits"]
        assert isinstance(value, torch.Tensor)
        return value


def load_run(path: str | Path) -> LoadedRun:
    """Rebuild a run's model from a run folder (best.pt, else last.pt) or a checkpoint file."""
    path = Path(path)
    state = load_checkpoint(path)
    require_image_task(state, path)
    config = config_from_dict(state["config"])  # as the run saved it, for reports
    architecture = config_from_dict(state["config"]).model
    architecture.weights = None  # the checkpoint holds the weights: never fetch pretrained ones
    architecture.init_from = None
    input_shape = (int(state["input_shape"][0]), int(state["input_shape"][1]), int(state["input_shape"][2]))
    built: nn.Module | DeepfitError
    try:
        built = build_model(architecture, input_shape=input_shape, num_classes=len(state["classes"]))
    except ConfigError as err:  # the user's own class, not named with --model.class / model=
        if not architecture.class_path:
            raise
        built = err
    else:
        load_model_state(built, state["model"], path)
        built.eval()
    run_dir = path if path.is_dir() else path.parent.parent  # runs/<name>/checkpoints/best.pt
    mean, std = tuple(float(m) for m in state["mean"]), tuple(float(s) for s in state["std"])
    return LoadedRun(run_dir, built, config, list(state["classes"]), input_shape, mean, std)


# --- layers -----------------------------------------------------------------------------


def list_layer_names(model: nn.Module) -> list[str]:
    """Every named sub-module ('features.0', 'classifier.3', ...), in definition order."""
    return [name for name, _ in model.named_modules() if name]


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called `name`; an unknown name lists the valid ones."""
    modules = dict(model.named_modules())
    if not name or name not in modules:
        described = ", ".join(f"{n} ({type(m).__name__})" for n, m in modules.items() if n)
        raise InspectError(f"unknown layer {name!r}; valid layers: {described}")
    return modules[name]


def conv_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def find_conv(model: nn.Module, name: str | None = None) -> tuple[str, nn.Conv2d]:
    """The convolution `name`, or the first one; anything else lists the convolution layers."""
    names = conv_layer_names(model)
    if not names:
        raise InspectError(f"{type(model).__name__} has no Conv2d layer to show filters of")
    chosen = name if name is not None else names[0]
    layer = find_layer(model, chosen)
    if not isinstance(layer, nn.Conv2d):
        raise InspectError(f"layer {chosen!r} is a {type(layer).__name__}, not a Conv2d; convolution layers: {', '.join(names)}")
    return chosen, layer


def capture_output(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The output of layer `name` when `model` runs on `x`, caught by a forward hook that is
    removed again even if the forward pass fails."""
    layer = find_layer(model, name)
    caught: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: caught.append(output.detach()))
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return caught[0]


# --- Grad-CAM ---------------------------------------------------------------------------


@dataclass
class GradCam:
    heatmaps: torch.Tensor  # (B, H, W) at the input size, each scaled to 0..1
    targets: torch.Tensor  # (B,) the class each map explains
    probs: torch.Tensor  # (B, K) softmax of the logits


def grad_cam(model: nn.Module, x: torch.Tensor, *, layer: str | None = None, target: int | None = None) -> GradCam:
    """Grad-CAM (Selvaraju et al. 2017) at a convolution layer (default: the last one).

    Each channel of the layer's output A (B, C, h, w) is weighted by the mean gradient of the
    target class score over its positions; the map is ReLU(sum_c weight_c * A_c), upsampled
    to the input size. The target is the predicted class unless `target` is given.
    """
    name = layer if layer is not None else last_useful_conv(model, x)
    module = find_layer(model, name)
    caught: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, inputs, output: caught.append(output))
    try:
        model.eval()
        with torch.enable_grad():
            logits = model(x)
            targets = logits.argmax(1) if target is None else torch.full((len(x),), target, dtype=torch.long)
            score = logits.gather(1, targets.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(score, caught[0])
    finally:
        handle.remove()
    activation = caught[0].detach()
    if activation.dim() != 4:
        raise InspectError(f"Grad-CAM needs a layer with (B, C, H, W) output; {name!r} gives {tuple(activation.shape)}")
    if activation.shape[2] * activation.shape[3] == 1:
        raise InspectError(
            f"layer {name!r} gives 1x1 maps at this input size, so Grad-CAM there has no spatial detail; pass --layer with an earlier convolution: {', '.join(conv_layer_names(model))}"
        )
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = torch.relu((weights * activation).sum(1, keepdim=True))  # (B, 1, h, w)
    cam = nn.functional.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return GradCam(cam / peak, targets.detach(), logits.detach().softmax(1))


def last_useful_conv(model: nn.Module, x: torch.Tensor) -> str:
    """The last convolution whose maps are larger than 1x1 for input `x` (resnet18 on 32x32 ends in 1x1 maps)."""
    last = last_conv_name(model)
    sizes: dict[str, int] = {}
    handles = [
        find_layer(model, name).register_forward_hook(lambda m, i, out, name=name: sizes.__setitem__(name, out.shape[2] * out.shape[3]))
        for name in conv_layer_names(model)
    ]
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    useful = [name for name in conv_layer_names(model) if sizes.get(name, 0) > 1]
    if not useful:
        raise InspectError(
            f"every convolution of {type(model).__name__} gives 1x1 maps at this input size; pass --layer with a layer giving (B, C, H, W)"
        )
    return useful[-1] if sizes.get(last, 0) <= 1 else last


def last_conv_name(model: nn.Module) -> str:
    names = conv_layer_names(model)
    if not names:
        raise InspectError(f"{type(model).__name__} has no Conv2d layer; pass --layer with a layer giving (B, C, H, W)")
    return names[-1]


# --- choosing images ----------------------------------------------------------------------


def choose_sample(total: int, count: int, *, seed: int = 0) -> torch.Tensor:
    """`count` distinct indices out of `total`, drawn with a fixed seed (the same every time)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[: min(count, total)].sort().values


def choose_mistakes(logits: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` wrong predictions with the highest loss (the most confident wrong)."""
    losses = nn.functional.cross_entropy(logits, labels, reduction="none")
    wrong = torch.nonzero(logits.argmax(1) != labels).flatten()
    order = losses[wrong].argsort(descending=True)
    return wrong[order[:count]]


def confusion_counts(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    return confusion_matrix(preds, labels, num_classes).numpy()


def load_image_file(path: str | Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """Any image file -> uint8 (C, H, W) in the run's channels and size, by the decoder training
    and `predict` use (BMP, TIFF, a colour WebP for a grayscale model, ...)."""
    from deepfit.data.decode import decode_image

    file = Path(path)
    if file.is_dir():
        raise InspectError(f"--image {file} is a folder; give one image file")
    if not file.is_file():
        raise InspectError(f"--image {file}: no such file")
    try:
        return torch.as_tensor(decode_image(file, channels=shape[0], size=(shape[1], shape[2])))
    except DeepfitError as err:
        raise InspectError(f"--image {err}") from None


# --- figures ------------------------------------------------------------------------------


@dataclass
class ShowOptions:
    image: str | None = None  # an image file for features/gradcam (default: test images)
    layer: str | None = None  # a layer name for filters/features/gradcam
    count: int | None = None  # how many images (or feature maps) to draw


def make_figure(run: LoadedRun, kind: str, options: ShowOptions | None = None) -> Figure:
    """The figure `deepfit show KIND` draws for this run."""
    makers: dict[str, Callable[[LoadedRun, ShowOptions], Figure]] = {
        "curves": curves_figure,
        "samples": samples_figure,
        "predictions": predictions_figure,
        "confusion": confusion_figure,
        "mistakes": mistakes_figure,
        "filters": filters_figure,
        "features": features_figure,
        "gradcam": gradcam_figure,
    }
    if kind not in makers:
        raise InspectError(f"unknown figure {kind!r}; valid: {', '.join(FIGURE_KINDS)}")
    return makers[kind](run, options or ShowOptions())


def curves_figure(run: LoadedRun, options: ShowOptions) -> Figure:
    path = run.run_dir / "metrics.csv"
    if not path.is_file():
        raise InspectError(f"{run.run_dir} has no metrics.csv to draw curves from")
    return plots.plot_curves(read_metrics_csv(path), lrs=read_lr_csv(run.run_dir / LR_FILE))


def samples_figure(run: LoadedRun, options: ShowOptions) -> Figure:
    run.eval_set()
    train = run.cache["train_set"]
    assert isinstance(train, ImageSet)
    index = choose_sample(len(train), options.count or 32, seed=run.config.train.seed)
    subset = load_images(train.subset(index))  # a streamed split: only these are decoded
    title = f"Training samples and their labels ({len(subset)} of {len(train)})"
    return plots.plot_samples(subset.images.numpy(), subset.labels.numpy(), run.classes, title=title)


def predictions_figure(run: LoadedRun, options: ShowOptions) -> Figure:
    images, logits = run.eval_set(), run.eval_logits()
    index = choose_sample(len(images), options.count or 24, seed=run.config.train.seed)
    probs = logits[index].softmax(1)
    preds = probs.argmax(1)
    chosen = images.subset(index)
    return plots.plot_predictions(
        chosen.images.numpy(), chosen.labels.numpy(), preds.numpy(), run.classes, probs=probs.max(1).values.numpy()
    )


def confusion_figure(run: LoadedRun, options: ShowOptions) -> Figure:
    labels, preds = run.eval_set().labels, run.eval_logits().argmax(1)
    return plots.plot_confusion(confusion_counts(preds, labels, len(run.classes)), run.classes)


def mistakes_figure(run: LoadedRun, options: ShowOptions) -> Figure:
    images, logits = run.eval_set(), run.eval_logits()
    index = choose_mistakes(logits, images.labels, options.count or 16)
    chosen = images.subset(index)
    probs = logits[index].softmax(1)
    losses = nn.functional.cross_entropy(logits[index], chosen.labels, reduction="none")
    return plots.plot_mistakes(
        chosen.images.numpy(), chosen.labels.numpy(), probs.argmax(1).numpy(), run.classes,
        probs=probs.max(1).values.numpy(), losses=losses.numpy(),
    )  # fmt: skip


def filters_figure(run: LoadedRun, options: ShowOptions) -> Figure:
    name, conv = find_conv(run.model, options.layer)
    return plots.plot_filters(conv.weight.detach().numpy(), title=f"Filters of {name}")


def chosen_images(run: LoadedRun, options: ShowOptions, default_count: int) -> tuple[torch.Tensor, list[str]]:
    """uint8 (N, C, H, W) images for features/gradcam and their true labels ('' when unknown)."""
    if options.image is not None:
        return load_image_file(options.image, run.input_shape)[None], [""]
    images = run.eval_set()
    chosen = images.subset(choose_sample(len(images), options.count or default_count, seed=run.config.train.seed))
    return chosen.images, [run.classes[int(y)] for y in chosen.labels]


def features_figure(run: LoadedRun, options: ShowOptions) -> Figure:
    name = options.layer if options.layer is not None else conv_layer_names(run.model)[0] if conv_layer_names(run.model) else ""
    if not name:
        raise InspectError(f"{type(run.model).__name__} has no Conv2d layer to show feature maps of; pass --layer NAME")
    images, _ = chosen_images(run, ShowOptions(options.image, options.layer, 1), 1)
    maps = capture_output(run.model, name, run.normalise(images[:1]))[0]
    if maps.dim() != 3:
        raise InspectError(f"layer {name!r} gives {tuple(maps.shape)} per image, not feature maps (C, H, W); pick a convolution layer")
    return plots.plot_features(maps.numpy(), image=images[0].numpy(), title=f"Feature maps of {name}", max_maps=options.count or 64)


def gradcam_figure(run: LoadedRun, options: ShowOptions) -> Figure:
    images, truths = chosen_images(run, options, 8)
    cam = grad_cam(run.model, run.normalise(images), layer=options.layer)
    titles = []
    for i, truth in enumerate(truths):
        target = int(cam.targets[i])
        titles.append(f"{run.classes[target]} {float(cam.probs[i, target]):.0%}" + (f"\n/ {truth}" if truth else ""))
    return plots.plot_gradcam(images.numpy(), cam.heatmaps.numpy(), titles)
