"""Start-up: help, usage errors and `import deepfit` load no heavy library (checked by what is in
sys.modules, not by timing); bare `deepfit`, `--version`, Ctrl-C during start-up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

import deepfit
from tests.conftest import REPO, write_tiny_idx

# What `deepfit --help` and usage errors must not pay for: torch alone takes seconds to import.
NOT_FOR_HELP = ("torch", "torchvision", "matplotlib", "torchmetrics")
# What the library must not load until a feature needs it (torch itself is fine once a name is used).
NOT_FOR_IMPORT = (
    "torchvision.models",
    "torch._dynamo",
    "matplotlib",
    "torchmetrics",
    "mlflow",
    "tensorboard",
    "fastapi",
    "torch_geometric",
)

# Runs the CLI's main() in a fresh interpreter, then reports its exit code and the heavy modules loaded.
CLI_PROBE = """
import json, sys
from deepfit.cli import main
try:
    code = main(sys.argv[2:])
except SystemExit as stop:  # --help and --version exit through argparse
    code = stop.code
print(json.dumps({"code": code, "loaded": [m for m in json.loads(sys.argv[1]) if m in sys.modules]}))
"""


def probe(code: str, *args: str, tmp_path: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(NOT_FOR_HELP + NOT_FOR_IMPORT), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("args", "code"),
    [(["--help"], 0), (["train", "--help"], 0), (["--version"], 0), ([], 0), (["trian"], 2), (["train", "--lr", "1"], 2),
     (["train", "--optim.learning_rate", "1"], 2), (["evaluate", "run", "--split", "tst"], 2)],
)  # fmt: skip
def test_help_and_usage_errors_do_not_import_torch(args: list[str], code: int, tmp_path: Path) -> None:
    result = probe(CLI_PROBE, *args, tmp_path=tmp_path)
    assert result == {"code": code, "loaded": []}
    assert not list(tmp_path.iterdir())  # no run folder for help or bad input


def test_import_deepfit_and_its_entry_points_load_no_model_zoo_plots_or_extras(tmp_path: Path) -> None:
    code = (
        "import json, sys, deepfit\n"
        "names = [deepfit.fit, deepfit.Predictor, deepfit.evaluate_checkpoint, deepfit.export_checkpoint, deepfit.build_model]\n"
        "print(json.dumps({'code': 0, 'loaded': [m for m in json.loads(sys.argv[1]) if m in sys.modules]}))\n"
    )
    result = probe(code, tmp_path=tmp_path)
    assert set(result["loaded"]) == {"torch"}  # type: ignore[arg-type]


def test_the_lazy_package_exports_the_same_names() -> None:
    import deepfit.fit  # the submodule shares its name with the function: the package keeps the function

    assert isinstance(deepfit.fit, types.FunctionType) and deepfit.fit.__module__ == "deepfit.fit"
    for name in deepfit.__all__:
        assert getattr(deepfit, name) is not None
    assert set(deepfit.__all__) <= set(dir(deepfit))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = deepfit.nope  # type: ignore[attr-defined]


def test_version_matches_the_package_metadata() -> None:
    declared = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert declared is not None and deepfit.__version__ == declared.group(1)


@pytest.mark.parametrize(("entry", "frozen"), [("main()", True), ("main(sys.argv[1:])", False)])
def test_the_console_script_spares_the_collector_its_walk_at_exit(entry: str, frozen: bool, tmp_path: Path) -> None:
    """The interpreter's last collections walked the whole torch heap (1.1-1.4 s per command); the
    console script hides the heap from them as it returns. main(argv) called from Python does not."""
    # frozen: more objects frozen than before main() (a machine's site packages may have frozen some at start-up)
    code = f"import gc, sys\nfrom deepfit.cli import main\nbefore = gc.get_freeze_count()\ncode = {entry}\nprint(gc.get_freeze_count() > before, code)"
    done = subprocess.run(
        [sys.executable, "-c", code, "trian"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert done.stdout.split() == [str(frozen), "2"], done.stderr


@pytest.mark.parametrize(("entry", "frozen"), [("main()", True), ("main(sys.argv[1:])", False)])
def test_console_training_imports_torch_with_the_collector_paused_then_on(entry: str, frozen: bool, tmp_path: Path) -> None:
    """Collections during torch's and torch._dynamo's imports walked the growing heap again and
    again; the console script pauses the collector for them and freezes what they built. Training
    itself must run with the collector on."""
    data = write_tiny_idx(tmp_path / "data")
    code = (
        "import gc, json, sys\n"
        "before = gc.get_freeze_count()\n"  # what the machine's site packages froze, if anything
        "import deepfit.fit\n"
        "module = sys.modules['deepfit.fit']\n"
        "def fit(*args, real=module.fit, **kwargs):\n"
        "    state = {'on': gc.isenabled(), 'frozen': gc.get_freeze_count() > before, 'dynamo': 'torch._dynamo' in sys.modules}\n"
        "    print(json.dumps(state), file=sys.stderr, flush=True)\n"
        "    return real(*args, **kwargs)\n"
        "module.fit = fit\n"
        "from deepfit.cli import main\n"
        f"sys.exit({entry})"
    )
    args = ["train", "--data", "mnist", "--data-dir", str(data), "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")]
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.strip().splitlines()[0]) == {"on": True, "frozen": frozen, "dynamo": frozen}


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path: Path) -> None:
    data = write_tiny_idx(tmp_path / "data")
    # Ctrl-C as in a terminal: a suite started in the background by a script (`make test &`) hands
    # its children SIGINT ignored, and Python keeps it so; 'ready' from inside main() (printed before
    # it, a loaded machine could hold the child between the print and main(): a traceback)
    ready = (
        "import signal, sys, deepfit.cli as cli\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "def run(argv, run=cli.run, **options):\n"
        "    print('ready', flush=True)\n"
        "    return run(argv, **options)\n"
        "cli.run = run\n"
        "sys.exit(cli.main(sys.argv[1:]))"
    )
    args = ["train", "--data", "mnist", "--data-dir", str(data), "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")]
    child = subprocess.Popen([sys.executable, "-c", ready, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGINT)  # main() is now importing torch or building the data and model (seconds)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("deepfit: stopped: interrupted"), err  # during the imports, or "... before training started: ..."
    assert not list((tmp_path / "run").rglob("*.pt"))


def test_training_on_mnist_loads_no_model_zoo_or_metrics_library(tmp_path: Path) -> None:
    """torchmetrics took about 3 s of every training process (a tenth of the MNIST recipe) for
    three numbers; torchvision's model zoo is for resnet18 alone. (torch._dynamo does load: torch's
    optimizers import it when they are built.)"""
    data = write_tiny_idx(tmp_path / "data", side=28)
    args = ["train", "--data", "mnist", "--data-dir", str(data), "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")]
    result = probe(CLI_PROBE, *args, tmp_path=tmp_path)
    assert result["code"] == 0
    assert set(result["loaded"]) == {"torch", "torch._dynamo", "matplotlib"}  # type: ignore[arg-type]  # matplotlib draws curves.png
