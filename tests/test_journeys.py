"""Issue 12: the journeys a new user took that broke or misled, each replayed on a finished run
(export without onnx, one test accuracy per run, evaluations beside the run's own, images for
`show`, predict's edge cases)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from deepfit.checkpoint import load_checkpoint
from tests.conftest import write_tiny_idx

TRAIN = ("--model", "lenet", "--epochs", "3", "--no-progress", "--data.batch-size", "16", "--sched.name", "none", "--optim.lr", "0.02")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 3-epoch lenet run on tiny MNIST-format data, and what `train` printed."""
    from deepfit.cli import main

    root = tmp_path_factory.mktemp("journeys")
    data = write_tiny_idx(root / "idx", train=200, test=60, side=12, seed=5)
    out = root / "run"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "--data", "mnist", "--data-dir", str(data), "--out", str(out), *TRAIN]) == 0
    return out, printed.getvalue()


@pytest.fixture
def run(finished: tuple[Path, str], tmp_path: Path) -> Path:
    """A private copy of the finished run (commands write into it)."""
    return Path(shutil.copytree(finished[0], tmp_path / "run"))


# -- item 1: export needs onnx; a missing package is one line, exit 2, nothing left behind --


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_export_without_an_onnx_package_is_one_line_and_leaves_nothing(
    cli, run: Path, monkeypatch: pytest.MonkeyPatch, package: str
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, package, None)  # what `import onnx` sees when it is not installed
    result = cli("export", str(run), "--format", "onnx")
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err.strip() == (
        f"deepfit: error: deepfit export --format onnx needs the package {package!r}, which is not installed: pip install {package}"
    )
    assert not (run / "export").exists()


def test_a_failed_export_removes_the_folder_it_created(cli, run: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import importlib

    from deepfit.export import ExportError

    def broken(*args: object) -> None:
        raise ExportError("cannot export this model")

    monkeypatch.setattr(importlib.import_module("deepfit.export"), "write_onnx", broken)
    result = cli("export", str(run), "--format", "onnx")
    assert result.code == 2 and not (run / "export").exists()
