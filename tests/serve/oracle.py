"""What `deepfit predict --format json` says about files: the oracle the server must match."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from deepfit.cli import main


def predict_cli(run: Path, paths: list[Path], *, topk: int) -> list[dict[str, Any]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["predict", str(run), *map(str, paths), "--format", "json", "--topk", str(topk), "--no-progress"])
    assert code == 0
    return list(json.loads(out.getvalue()))


def assert_same(served: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Same label, index and top-k order; probabilities equal up to float rounding of batch sizes."""
    assert len(served) == len(expected)
    for got, want in zip(served, expected, strict=True):
        assert (got["label"], got["index"]) == (want["label"], want["index"]), want["path"]
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)
        assert [t["label"] for t in got["topk"]] == [t["label"] for t in want["topk"]]
        assert [t["probability"] for t in got["topk"]] == pytest.approx([t["probability"] for t in want["topk"]], abs=1e-5)
