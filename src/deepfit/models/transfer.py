"""Transfer learning as metadata: which layer is a model's head, its backbone/head parameter
split, freezing the backbone, learning-rate groups, and copying the weights that match."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepfit.config import ModelConfig
from deepfit.errors import ConfigError

# Layers whose forward pass differs in training mode; a frozen backbone keeps them in eval mode.
MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)


def head_name(model: nn.Module) -> str:
    """The head is the last nn.Linear of the model (every registered model ends in one: resnet18's
    `fc`, the ConvNets' last classifier layer, the mlp's output layer)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer to serve as the head for transfer learning")
    return names[-1]


def is_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone, head) parameters."""
    head = head_name(model)
    backbone: list[nn.Parameter] = []
    head_params: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        (head_params if is_head(name.rpartition(".")[0], head) else backbone).append(param)
    return backbone, head_params


def freeze_backbone(model: nn.Module) -> None:
    """Feature extraction: backbone parameters stop requiring gradients, and its BatchNorm and
    dropout layers stay in eval mode even when fit() calls model.train() each epoch (a forward
    pre-hook), so the running statistics are frozen too, as Keras does for frozen layers."""
    head = head_name(model)
    backbone, _ = split_parameters(model)
    for param in backbone:
        param.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, MODE_DEPENDENT) and not is_head(name, head):
            module.register_forward_pre_hook(keep_eval)


def keep_eval(module: nn.Module, args: Any) -> None:
    module.eval()


def starts_pretrained(config: ModelConfig) -> bool:
    """The model starts from learned weights (--model.weights or --init-from): fine-tuning."""
    has_weights = config.weights is not None and config.weights.lower() not in ("none", "")
    return has_weights or bool(config.init_from)


def parameter_groups(model: nn.Module, *, lr: float, config: ModelConfig) -> list[dict[str, Any]]:
    """Optimizer parameter groups, head first (the logged lr is the head's):
    - freeze backbone: the head alone (frozen parameters never reach the optimizer);
    - fine-tuning (pretrained weights or --init-from): backbone at lr * backbone_lr_scale;
    - otherwise one group at lr."""
    if config.freeze != "backbone" and (not starts_pretrained(config) or config.backbone_lr_scale == 1.0):
        return [{"params": list(model.parameters()), "lr": lr, "name": "all"}]
    backbone, head = split_parameters(model)
    if config.freeze == "backbone":
        return [{"params": head, "lr": lr, "name": "head"}]
    return [{"params": head, "lr": lr, "name": "head"}, {"params": backbone, "lr": lr * config.backbone_lr_scale, "name": "backbone"}]


@dataclass
class WeightCopy:
    """What copy_matching_weights did: tensors copied and the ones left as built, with why."""

    copied: list[str]
    skipped: list[str]  # "<name>: <reason>" for each model tensor not copied
    unused: list[str]  # source tensors the model has no place for


def copy_matching_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], *, new_head: bool = False) -> WeightCopy:
    """Copy every tensor whose name and shape match into `model`'s state; the rest stays as built.
    new_head: leave the head as built too (its rows belong to the source's classes)."""
    own = model.state_dict()
    head = head_name(model) if new_head else None
    fresh = {k for k in own if head is not None and is_head(k.rpartition(".")[0], head)}
    matched = {k: v for k, v in weights.items() if k in own and k not in fresh and tuple(own[k].shape) == tuple(v.shape)}
    model.load_state_dict(matched, strict=False)
    skipped = [f"{k}: {'new head for other classes' if k in fresh else mismatch(own[k], weights.get(k))}" for k in own if k not in matched]
    unused = [k for k in weights if k not in own]
    return WeightCopy([k for k in own if k in matched], skipped, unused)


def mismatch(own: torch.Tensor, other: torch.Tensor | None) -> str:
    if other is None:
        return "not in the source"
    return f"shape {tuple(other.shape)} in the source, {tuple(own.shape)} here"
