"""Your own nn.Module as a model: recorded in the config and checkpoint as 'module:Class'
(model.class_path, `--model.class pkg.mod:Net`) and rebuilt as Class() with no arguments.

Importing a module runs its code. deepfit imports a class only when the person running it names
that class (`--model.class`, or allow_model_class()), never because a checkpoint names it: loading
a checkpoint stays as safe as torch.load(weights_only=True). A checkpoint that records a class
nobody named is one line saying how to supply the model."""

from __future__ import annotations

import importlib

from torch import nn

from deepfit.errors import ConfigError

ALLOWED: set[str] = set()  # class paths the user named in this process


def allow_model_class(class_path: str) -> None:
    """The user named this class (a flag or an explicit call): deepfit may import it."""
    ALLOWED.add(class_path)


def class_path_of(model: nn.Module) -> str:
    """'module:Class' of a model's class (one defined in __main__ or inside a function is
    recorded too, and rebuilding it then asks for the model itself)."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def build_user_model(class_path: str) -> nn.Module:
    """Class() from 'module:Class', only for a class the user named; otherwise how to supply it."""
    if class_path not in ALLOWED:
        raise ConfigError(
            f"this run was trained with your own model {class_path}; deepfit never imports code a checkpoint names: "
            f"pass --model.class {class_path} (command line) or model={class_path.rsplit(':', 1)[-1]}() (Python API)"
        )
    module_name, _, qualname = class_path.partition(":")
    try:
        target: object = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"--model.class {class_path}: cannot import it ({type(err).__name__}: {err}); is its folder on PYTHONPATH?"
        ) from None
    if not (isinstance(target, type) and issubclass(target, nn.Module)):
        raise ConfigError(f"--model.class {class_path} is not an nn.Module class")
    try:
        return target()
    except TypeError as err:
        raise ConfigError(f"--model.class {class_path}: deepfit builds it with no arguments: {err}") from None
