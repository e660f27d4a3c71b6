"""The file side of every task's `deepfit export`: metadata into an ONNX or TorchScript file,
tracing to TorchScript, loading the written file back (onnxruntime / torch.jit.load) and comparing
its outputs with PyTorch's. Task-neutral: the image, regression and node exports each build their
own module and sample inputs, and pass their own error class, so a failure names their task."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfit.errors import DeepfitError, first_line
from deepfit.outfiles import require_output

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
EXTRA_FILE = "deepfit.json"  # the TorchScript extra file holding the metadata

ErrorType = type[DeepfitError]
ONNX_EXPORTERS = ("dynamo", "torchscript")  # tried in this order: torch.export first, then the TorchScript-based one


def export_path(run_dir: Path | None, checkpoint: Path, format: str) -> Path:
    """runs/<name>/export/model.onnx for a run; <checkpoint stem>.onnx beside a bare checkpoint."""
    if run_dir is not None:
        return run_dir / "export" / f"model{SUFFIXES[format]}"
    return checkpoint.with_name(checkpoint.stem + SUFFIXES[format])


WRONG_SUFFIXES = {"onnx": (".pt", ".pth", ".ckpt"), "torchscript": (".onnx",)}


def require_export_target(target: Path, format: str, *, error: ErrorType) -> None:
    """An export never replaces a checkpoint (`--out runs/x/checkpoints/best.pt` overwrote the very
    weights it exported), and its name says its format: ONNX in a .pt file, or TorchScript in a
    .onnx one, would be opened by the wrong runtime."""
    if target.suffix.lower() in WRONG_SUFFIXES[format]:
        written = "an ONNX" if format == "onnx" else "a TorchScript"
        raise error(f"--out {target}: {target.suffix} is not for {written} file; name it *{SUFFIXES[format]}")
    require_output(target, what="an export", error=error)


@contextlib.contextmanager
def staged_file(target: Path, *, format: str, error: ErrorType) -> Iterator[Path]:
    """A hidden file of its own beside `target` to write and check an export in. It takes `target`'s
    name only when the block ends without an error, so a failed export writes nothing and leaves an
    earlier file of that name as it was; folders made for it are removed again (only when empty). A
    place that cannot be written, or a target require_export_target refuses, is one `error` naming
    `target`, before any export work."""
    require_export_target(target, format, error=error)
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    staging: Path | None = None
    try:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
            os.close(fd)
        except OSError as err:
            raise error(f"cannot write {target}: {err.strerror or err}") from None
        staging = Path(name)
        yield staging
        try:
            os.replace(staging, target)
        except OSError as err:
            raise error(f"cannot write {target}: {err.strerror or err}") from None
    except BaseException:
        if staging is not None:
            staging.unlink(missing_ok=True)
        for made in created:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()  # only when empty: never deletes what someone else put there
        raise


CAUSE_CHARS = 300  # of each exporter error's first line in a message: ONNX's can be a whole graph dump


def export_onnx(
    module: torch.nn.Module, example: torch.Tensor, *, error: ErrorType, what: str, names: tuple[str, str] = ("input", "logits")
) -> tuple[Any, str]:
    """(onnx.ModelProto with a dynamic batch dimension, the exporter that made it): the dynamo
    exporter, or the TorchScript-based one when that fails (torch versions and models it cannot
    convert, or no onnxscript). When both fail, `error` names each one's cause."""
    failures = []
    for exporter in ONNX_EXPORTERS:
        try:
            with quiet_exporters():
                return onnx_proto(module, example, dynamo=exporter == "dynamo", names=names), exporter
        except Exception as err:  # the exporters raise many types; all mean "this exporter cannot convert it"
            failures.append(f"{exporter} exporter: {describe(err)}")
    raise error(f"ONNX export of {what} failed; " + "; ".join(failures))


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """The exporters' own chatter held back: progress on stdout, warnings, and torch.onnx's log lines
    (torch 2.10's dynamo exporter logs four about torchvision's detection ops for any resnet18)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def onnx_proto(module: torch.nn.Module, example: torch.Tensor, *, dynamo: bool, names: tuple[str, str]) -> Any:
    """The module as an onnx.ModelProto, input and output named `names`, batch dimension dynamic."""
    import onnx

    named: dict[str, Any] = {"input_names": [names[0]], "output_names": [names[1]], "verbose": False}
    if dynamo:
        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=({0: batch},), external_data=False, **named)
        assert program is not None
        return program.model_proto
    buffer = io.BytesIO()
    axes = {names[0]: {0: "batch"}, names[1]: {0: "batch"}}
    file: Any = buffer  # the annotation says a path; a file object works and keeps it off the disk
    torch.onnx.export(module, (example,), file, dynamo=False, dynamic_axes=axes, opset_version=17, **named)
    return onnx.load_from_string(buffer.getvalue())


def describe(err: BaseException) -> str:
    """The error and the causes it chains (the exporters wrap the real reason), one line each, joined."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        parts.append(f"{first_line(current, named=True, limit=CAUSE_CHARS)}")
        current = current.__cause__ or current.__context__
    return " <- caused by ".join(parts)


def save_onnx(proto: Any, meta: dict[str, Any], target: Path) -> None:
    """Write an onnx.ModelProto with `meta` as metadata_props (non-strings as JSON)."""
    import onnx

    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(target))


def save_torchscript(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], target: Path, meta: dict[str, Any], *, error: ErrorType, what: str
) -> None:
    """Trace `module` on `inputs` and save it with `meta` as the deepfit.json extra file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
            traced = torch.jit.trace(module, inputs, check_trace=False)
            torch.jit.save(traced, str(target), _extra_files={EXTRA_FILE: json.dumps(meta)})
    except Exception as err:  # tracing raises many types; all mean "this model cannot be traced"
        raise error(f"TorchScript export of {what} failed: {first_line(err, named=True, limit=CAUSE_CHARS)}") from None


def onnx_session(target: Path, *, error: ErrorType) -> Any:
    """An onnxruntime CPU session on the written file."""
    import onnxruntime

    try:
        return onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types for graphs it cannot load
        raise error(f"onnxruntime cannot load the exported file: {first_line(err, named=True, limit=CAUSE_CHARS)}") from None


def load_torchscript(target: Path, *, error: ErrorType) -> torch.jit.ScriptModule:
    """The written TorchScript file, which must still carry its metadata."""
    extra = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        loaded = torch.jit.load(str(target), map_location="cpu", _extra_files=extra)
    if not extra[EXTRA_FILE]:
        raise error(f"{target} lost its {EXTRA_FILE} extra file")
    return loaded


def difference(
    run: Callable[..., np.ndarray],
    inputs: tuple[np.ndarray, ...],
    expected: np.ndarray,
    *,
    error: ErrorType,
    format: str,
    on: str,
    shape_error: ErrorType | None = None,
) -> float:
    """Largest |file - PyTorch| of run(*inputs) against `expected`; the file failing to run is `error`, a wrong shape
    `shape_error` (default `error`)."""
    try:
        got = run(*inputs)
    except Exception as err:  # any runtime failure means the file is not usable as written
        raise error(f"the {format} file could not be run on {on}: {first_line(err, named=True, limit=CAUSE_CHARS)}") from None
    if got.shape != expected.shape:
        raise (shape_error or error)(f"{format} export returns shape {got.shape} on {on}, the model {expected.shape}")
    return float(np.abs(got - expected).max())
