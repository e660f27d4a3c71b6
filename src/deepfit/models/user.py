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


def class_path_of(model: object) -> str:
    """'module:Class' of a model's class (one defined in __main__ or inside a function is
    recorded too, and rebuilding it then asks for the model itself), or of a Dataset's."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def unbuildable(class_path: str) -> str | None:
    """Why Class() from this path cannot be the model that trained, or None: a class of the
    script that trained (__main__ is deepfit's own when it runs), one defined inside a function,
    or torch's own (an nn.Sequential of layers, whose Sequential() is empty)."""
    module_name, _, qualname = class_path.partition(":")
    if module_name == "__main__":
        return "defined in the script that trained it"
    if "<locals>" in qualname:
        return "defined inside a function"
    if module_name_of(class_path) == "torch":
        return f"torch's own {qualname} ({qualname}() has none of its layers)"
    return None


def module_name_of(class_path: str) -> str:
    """The top-level package: 'torch' for torch.nn.modules.container:Sequential."""
    return class_path.partition(":")[0].split(".")[0]


def unbuildable_message(class_path: str, reason: str) -> str:
    return (
        f"{class_path} is {reason}, so deepfit cannot build it by name: pass the model itself in Python (model=...,"
        " as in Predictor.from_checkpoint(RUN, model=...)), or define its class in a module file and name it with"
        " --model.class module:Class"
    )


def build_user_model(class_path: str) -> nn.Module:
    """Class() from 'module:Class', only for a class the user named; otherwise how to supply it."""
    reason = unbuildable(class_path)
    if reason is not None and (class_path not in ALLOWED or module_name_of(class_path) == "torch"):
        raise ConfigError(unbuildable_message(class_path, reason))
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
        if reason is not None:  # a script's own class, named where that script is not what runs
            raise ConfigError(unbuildable_message(class_path, reason)) from None
        raise ConfigError(
            f"--model.class {class_path}: cannot import it ({type(err).__name__}: {err}); is its folder on PYTHONPATH?"
        ) from None
    if not (isinstance(target, type) and issubclass(target, nn.Module)):
        raise ConfigError(f"--model.class {class_path} is not an nn.Module class")
    try:
        return target()
    except TypeError as err:
        raise ConfigError(f"--model.class {class_path}: deepfit builds it with no arguments: {err}") from None
