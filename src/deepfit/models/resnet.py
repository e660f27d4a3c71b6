"""torchvision's ResNet-18 for transfer learning: ImageNet weights, a local state-dict file or
none; the input convolution adapted to the channel count and the head replaced for the classes."""

from __future__ import annotations

import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from deepfit.config import ModelConfig
from deepfit.errors import ConfigError
from deepfit.models import MODELS

if TYPE_CHECKING:
    from torchvision.models import ResNet

IMAGENET = "imagenet"


@MODELS.register("resnet18")
def build_resnet18(*, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """torchvision ResNet-18 (11M parameters) for transfer learning: --model.weights imagenet|FILE|none."""
    # The ImageNet stem (7x7 stride 2, max pool) stays as pretrained, so the weights keep their
    # meaning; the global average pool makes any input from about 8x8 up work (32x32 -> 1x1 maps).
    from torchvision.models import resnet18  # the model zoo pulls in torch._dynamo: only when used

    model = resnet18(weights=None)
    state = pretrained_state(config.weights)
    if state is not None:
        load_backbone(model, state, str(config.weights))
    model.conv1 = adapt_input_conv(model.conv1, input_shape[0])
    model.fc = nn.Linear(model.fc.in_features, num_classes)  # the new head: (B, 512) -> (B, num_classes)
    return model


def pretrained_state(weights: str | None) -> Mapping[str, torch.Tensor] | None:
    """The state dict named by --model.weights: None for none, torchvision's for imagenet, else a file."""
    if weights is None or weights.lower() in ("none", ""):
        return None
    if weights.lower() == IMAGENET:
        return imagenet_state()
    return state_dict_file(Path(weights))


def imagenet_state() -> Mapping[str, torch.Tensor]:
    """ResNet18_Weights.DEFAULT, from torch's hub cache or downloaded into it (needs the internet once)."""
    from torchvision.models import ResNet18_Weights

    try:
        return ResNet18_Weights.DEFAULT.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        url = ResNet18_Weights.DEFAULT.url
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise ConfigError(
            f"--model.weights imagenet: cannot get torchvision's ResNet18_Weights.DEFAULT ({err}); without internet, "
            f"put {url.rsplit('/', 1)[-1]} from {url} into {cache}, or pass --model.weights FILE or none"
        ) from None


def state_dict_file(path: Path) -> Mapping[str, torch.Tensor]:
    """A state dict saved with torch.save (read with weights_only=True); a deepfit checkpoint's
    'model' entry or a {'state_dict': ...} wrapper are unwrapped."""
    if not path.is_file():
        raise ConfigError(f"--model.weights {path}: no such file (use imagenet, none or a state-dict file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for files that are not safe state dicts
        raise ConfigError(f"--model.weights {path}: not a readable state dict ({type(err).__name__}: {first_line(err)})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"--model.weights {path}: expected a dict of tensors (a state dict)")
    return state


def load_backbone(model: ResNet, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load everything but the head (replaced anyway) into a 3-channel ResNet-18; anything else
    missing or not fitting is an error naming the tensors."""
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = model.load_state_dict(body, strict=False)
    except RuntimeError as err:  # shape mismatches raise even when strict=False
        raise ConfigError(f"--model.weights {source}: does not fit resnet18: {first_line(err)}") from None
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        detail = f"missing {', '.join(missing[:5]) or 'nothing'}; unexpected {', '.join(result.unexpected_keys[:5]) or 'nothing'}"
        raise ConfigError(f"--model.weights {source}: not a resnet18 state dict ({detail})")


def adapt_input_conv(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    """The first convolution for `channels` input channels. RGB filters (O, 3, k, k) become
    (O, C, k, k) by summing over RGB and spreading the sum evenly over the C channels, so a gray
    image copied into C channels gives the response the RGB filter gave to it (timm's rule)."""
    if channels == conv.in_channels:
        return conv
    adapted = nn.Conv2d(channels, conv.out_channels, 7, stride=2, padding=3, bias=False)  # torchvision's stem
    with torch.no_grad():
        summed = conv.weight.sum(dim=1, keepdim=True)  # (O, 1, k, k)
        adapted.weight.copy_(summed.div(channels).repeat(1, channels, 1, 1))
    return adapted


def first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300]
