"""A checkpoint that is not what it claims, through every command that reads one (evaluate,
predict, export): one clear line on stderr, exit code 2, no traceback, and torch.load is never
called with weights_only=False."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from deepfit.checkpoint import FORMAT_VERSION
from tests.conftest import run_deepfit
from tests.test_export import write_checkpoint


def valid(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "good.pt", "lenet")


def edit_state(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    state = torch.load(valid(tmp_path), weights_only=True)
    change(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    return path


def missing(tmp_path: Path) -> Path:
    return tmp_path / "nowhere.pt"


def empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    return path


def truncated(tmp_path: Path) -> Path:
    data = valid(tmp_path).read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    return path


def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    return path


def foreign_state_dict(tmp_path: Path) -> Path:
    """A plain torch.save of a state dict: readable safely, but not a deepfit checkpoint."""
    path = tmp_path / "foreign.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    return path


def other_version(tmp_path: Path) -> Path:
    return edit_state(tmp_path, lambda s: s.update(format_version=FORMAT_VERSION + 1))


def wrong_architecture(tmp_path: Path) -> Path:
    """cnn_bn weights under a config that declares lenet."""
    cnn = torch.load(write_checkpoint(tmp_path / "cnn.pt", "cnn_bn"), weights_only=True)
    return edit_state(tmp_path, lambda s: s.update(model=cnn["model"]))


def wrong_shape(tmp_path: Path) -> Path:
    """The declared input shape no longer fits the first linear layer."""
    return edit_state(tmp_path, lambda s: s.update(input_shape=[1, 40, 40]))


def missing_weight(tmp_path: Path) -> Path:
    return edit_state(tmp_path, lambda s: s["model"].pop(next(iter(s["model"]))))


def unknown_model(tmp_path: Path) -> Path:
    return edit_state(tmp_path, lambda s: s["config"]["model"].update(name="no_such_net"))


def missing_classes(tmp_path: Path) -> Path:
    return edit_state(tmp_path, lambda s: s.pop("classes"))


def torchscript_export(tmp_path: Path) -> Path:
    """What `deepfit export --format torchscript` writes: torch.load warned, then advised weights_only=False."""
    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation: the format is still what export writes
        torch.jit.trace(torch.nn.Linear(3, 2), torch.zeros(1, 3)).save(str(path))
    return path


def onnx_export(tmp_path: Path) -> Path:
    """An ONNX file's opening bytes: ir_version 10, then producer_name 'pytorch'."""
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x0a\x12\x07pytorch\x1a\x052.14.1" + bytes(200))
    return path


def lr_find_folder(tmp_path: Path) -> Path:
    """What `deepfit lr-find` writes: it said 'holds no checkpoints/best.pt or checkpoints/last.pt'."""
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "lr-find.csv").write_text("step,lr,loss,smoothed_loss\n0,1e-07,2.3,2.3\n")
    return tmp_path / "sweep"


def empty_run_folder(tmp_path: Path) -> Path:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    return tmp_path / "run"


BAD = {
    "missing": (missing, "nowhere.pt: no such run folder or checkpoint"),
    "empty": (empty, "is empty"),
    "truncated": (truncated, "not a readable checkpoint"),
    "text file": (text_file, "checkpoint"),
    "foreign state dict": (foreign_state_dict, "not a deepfit checkpoint"),
    "other format version": (other_version, "format version"),
    "wrong architecture": (wrong_architecture, "do not fit the declared architecture"),
    "wrong input shape": (wrong_shape, "do not fit the declared architecture"),
    "missing weight": (missing_weight, "do not fit the declared architecture"),
    "unknown model": (unknown_model, "no_such_net"),
    "missing classes": (missing_classes, "lacks classes"),
    "run folder without checkpoints": (empty_run_folder, "no checkpoints/best.pt"),
    "lr-find folder": (lr_find_folder, "sweep is an lr-find folder (its lr-find.csv and lr-find.png): a learning-rate sweep"),
    "torchscript export": (torchscript_export, "model.pt is not a checkpoint: it is a TorchScript export; give the run folder"),
    "onnx export": (onnx_export, "model.onnx is not a checkpoint: it is an ONNX export"),
}


def image(tmp_path: Path) -> Path:
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(path)
    return path


COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "evaluate": lambda ckpt, tmp: ["evaluate", str(ckpt)],
    "export": lambda ckpt, tmp: ["export", str(ckpt), "--format", "onnx"],
    "predict": lambda ckpt, tmp: ["predict", str(ckpt), str(image(tmp))],
    "show": lambda ckpt, tmp: ["show", "filters", str(ckpt)],
}


@pytest.fixture
def torch_load_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Records every torch.load call's keyword arguments."""
    calls: list[dict[str, Any]] = []
    original = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_one_line_and_exit_2(
    case: str, command: str, cli, tmp_path: Path, torch_load_calls: list[dict[str, Any]]
) -> None:  # type: ignore[no-untyped-def]
    make, expected = BAD[case]
    checkpoint = make(tmp_path)
    torch_load_calls.clear()  # only the command's own loads count
    result = cli(*COMMANDS[command](checkpoint, tmp_path))
    assert result.code == 2, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepfit: error: ") and "Traceback" not in result.err
    assert expected in lines[0]
    assert all(call.get("weights_only") is True for call in torch_load_calls)


def test_a_real_process_prints_no_traceback(tmp_path: Path) -> None:
    """The console entry point in a child process, for one case per command."""
    for command, build in COMMANDS.items():
        done: subprocess.CompletedProcess[str] = run_deepfit(build(truncated(tmp_path), tmp_path), cwd=tmp_path)
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
