"""ONNX export falls back from the dynamo exporter to the TorchScript-based one (dynamo=False) when
the first fails, says which one wrote the file, and, when both fail, names each one's cause (the
error the exporter wraps, not only its first line)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch

from deepfit.export import export_checkpoint
from tests.test_export import inputs, pytorch_logits, write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def failing_exporter(monkeypatch: pytest.MonkeyPatch, *, fail_dynamo: bool, fail_torchscript: bool) -> list[bool]:
    """Replace torch.onnx.export with one whose chosen paths raise a wrapped error, as the dynamo
    exporter does (a ConversionError whose first line hides the cause); returns the dynamo flags seen."""
    real = torch.onnx.export
    calls: list[bool] = []

    def export(*args: Any, dynamo: bool = True, **kwargs: Any) -> Any:
        calls.append(dynamo)
        if (fail_dynamo and dynamo) or (fail_torchscript and not dynamo):
            which = "dynamo" if dynamo else "torchscript"
            try:
                raise KeyError(f"no {which} conversion for aten::mystery_op")
            except KeyError as cause:
                raise RuntimeError("Failed to convert the exported program to an ONNX model\nsecond line") from cause
        return real(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    return calls


@pytest.mark.parametrize("name", ["cnn_bn", "airbench"])
def test_a_failing_dynamo_exporter_falls_back_to_torchscript(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = failing_exporter(monkeypatch, fail_dynamo=True, fail_torchscript=False)
    checkpoint = write_checkpoint(tmp_path / "model.pt", name)
    result = export_checkpoint(checkpoint, format="onnx")
    assert calls == [True, False] and result.exporter == "torchscript" and result.max_abs_diff <= 1e-4
    shape = (3, 32, 32) if name == "airbench" else (1, 28, 28)
    x = inputs(shape, 3)  # a batch size the export did not trace with: the batch dimension is dynamic
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - pytorch_logits(checkpoint, x)).max() <= 1e-4


def test_the_dynamo_exporter_is_tried_first_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = failing_exporter(monkeypatch, fail_dynamo=False, fail_torchscript=True)
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        pytest.skip("onnxscript is not installed: the dynamo exporter cannot run here")
    result = export_checkpoint(write_checkpoint(tmp_path / "model.pt", "lenet"), format="onnx")
    assert calls == [True] and result.exporter == "dynamo"


def test_when_both_fail_the_one_line_error_carries_each_cause(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    failing_exporter(monkeypatch, fail_dynamo=True, fail_torchscript=True)
    result = cli("export", str(write_checkpoint(tmp_path / "model.pt")), "--format", "onnx")
    assert result.code == 2 and result.err.count("\n") == 1 and "Traceback" not in result.err
    assert "dynamo exporter: RuntimeError: Failed to convert" in result.err
    assert "no dynamo conversion for aten::mystery_op" in result.err  # the cause, beyond the first line
    assert "no torchscript conversion for aten::mystery_op" in result.err
    assert not (tmp_path / "model.onnx").exists()


def test_cli_names_the_exporter(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    failing_exporter(monkeypatch, fail_dynamo=True, fail_torchscript=False)
    result = cli("export", str(write_checkpoint(tmp_path / "model.pt")), "--format", "onnx")
    assert result.code == 0, result.err
    assert f"onnx (torchscript exporter): {tmp_path / 'model.onnx'}" in result.out


def test_the_exporters_log_lines_are_held_back_and_the_level_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch 2.10's dynamo exporter logs "Missing annotation for parameter 'rois' ..." four times for a resnet18
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    chatty, handler, real = logging.getLogger("torch.onnx._internal.exporter._schemas"), Keep(), torch.onnx.export

    def export(*args: Any, **kwargs: Any) -> Any:
        chatty.warning("Missing annotation for parameter 'rois'")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    chatty.addHandler(handler)
    try:
        export_checkpoint(write_checkpoint(tmp_path / "model.pt", "lenet"), format="onnx")
        chatty.warning("after the export")
    finally:
        chatty.removeHandler(handler)
    assert seen == ["after the export"]
