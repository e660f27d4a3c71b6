"""Shared fixtures: real-data locations (skipped when absent), tiny IDX data, and CLI runners."""

from __future__ import annotations

import gzip
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfit.cli import main

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("DEEPFIT_DATASETS", REPO.parent / "shared" / "datasets"))

# Tests of the optional extras (serve, graph, track) and the packages they need. `make test`
# installs them all; a machine with torch and pytest only (the GPU machines) leaves these files
# out of collection and says so in the header, instead of failing on the import.
EXTRA_TESTS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "httpx"),
    "test_graph.py": ("torch_geometric",),
    "test_tracking.py": ("tensorboard", "mlflow"),
}
MISSING_EXTRAS = {path: [name for name in modules if importlib.util.find_spec(name) is None] for path, modules in EXTRA_TESTS.items()}
collect_ignore = [path for path, missing in MISSING_EXTRAS.items() if missing]


def pytest_report_header() -> str | None:
    left_out = [f"{path} (no {', '.join(missing)})" for path, missing in MISSING_EXTRAS.items() if missing]
    return f"not collected, optional packages missing: {'; '.join(left_out)}" if left_out else None


# The CLI tests start deepfit in child processes that run in tmp folders: a relative PYTHONPATH
# (`PYTHONPATH=src python3 -m pytest`, how the GPU machines run the suite without pip) is made
# absolute so that they import the same deepfit as this process.
if os.environ.get("PYTHONPATH"):
    os.environ["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) if p else p for p in os.environ["PYTHONPATH"].split(os.pathsep))

# The one place tests pick their device: DEEPFIT_TEST_DEVICE (cpu, cuda, mps; default auto, the best
# available) becomes $DEEPFIT_DEVICE, which select_device("auto") honours, in this process and in
# the CLI processes tests start. `make test-gpu` sets it to cuda.
TEST_DEVICE = os.environ.get("DEEPFIT_TEST_DEVICE", "auto")
if TEST_DEVICE != "cpu":
    # cuBLAS reads its workspace setting once, when it starts: set it before any test touches
    # CUDA, so the train.deterministic tests are deterministic whatever ran before them.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def _test_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPFIT_DEVICE", TEST_DEVICE)


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    """Figures a test made through pyplot are closed after it (pyplot keeps them open otherwise)."""
    yield
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


@pytest.fixture
def device() -> torch.device:
    """The device training in this test runs on."""
    from deepfit.runtime import select_device

    return select_device(TEST_DEVICE)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep decoded-data caches out of the user's home during tests."""
    monkeypatch.setenv("DEEPFIT_CACHE", str(tmp_path_factory.getbasetemp() / "deepfit-cache"))


def real_dataset(name: str) -> Path:
    path = DATASETS / name
    if not path.exists():
        pytest.skip(f"real dataset {path} not found (set DEEPFIT_DATASETS to the folder of ../shared/datasets)")
    return path


@pytest.fixture
def mnist_dir() -> Path:
    return real_dataset("mnist")


@pytest.fixture
def fashion_dir() -> Path:
    return real_dataset("fashion-mnist")


@pytest.fixture
def cifar_zip() -> Path:
    return real_dataset("cifar10-jpg.zip")


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> Path:
    """Write `array` (uint8) as an IDX file, optionally gzip-compressed."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_tiny_idx(folder: Path, *, train: int = 120, test: int = 40, side: int = 12, compress: bool = True, seed: int = 0) -> Path:
    """A learnable MNIST-format dataset: the class sets which horizontal band is bright."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 40, size=(count, side, side)).astype(np.uint8)
        band = max(1, side // 10)
        for i, label in enumerate(labels):
            row = int(label) * side // 10
            images[i, row : row + band, :] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress=compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), compress=compress)
    return folder


@pytest.fixture
def tiny_idx(tmp_path: Path) -> Path:
    return write_tiny_idx(tmp_path / "tiny-idx")


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Run `deepfit ARGS` in-process from tmp_path; returns code, stdout and stderr."""
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> CliResult:
        code = main(list(args))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_deepfit(
    args: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "deepfit.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
