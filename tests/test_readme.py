"""Every `deepfit ...` command line in README.md's ```bash blocks runs, on tiny data, so the README
cannot drift from the CLI.

How it works (extend the tables when you add README commands):
1. `readme_commands()` takes each line of a bash block that starts with `deepfit ` (backslash
   continuations joined, `# comments` dropped). Optional `[...]` parts are dropped and of
   `a|b|c` alternatives the first is kept.
2. SUBSTITUTIONS replace placeholders (runs/<name>, ~/data/..., photos.zip, ...) with tiny files
   made in tmp_path by `workspace()`; named datasets (mnist, fashion-mnist) are tiny IDX sets
   found through $DEEPFIT_DATASETS.
3. FAST_FLAGS are appended to a command that does not set them already (1 epoch, 20 lr-find steps).
4. NOT_RUN lists the commands a test cannot run, each with its reason; they must still appear in
   the README (a stale entry fails), and their behaviour is tested elsewhere.
"""

from __future__ import annotations

import re
import shlex
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepfit.cli import main
from tests.conftest import REPO, write_tiny_idx

README = REPO / "README.md"

# placeholder in the README -> what the test puts there ({name} fields are filled by workspace())
SUBSTITUTIONS: list[tuple[str, str]] = [
    (r"runs/<earlier>", "{resnet_run}"),  # --init-from for resnet18 fine-tuning: an earlier resnet18 run
    (r"runs/<name>", "{run}"),
    (r"~/data/(mnist|fashion-mnist)", r"{datasets}/\1"),
    (r"--model\.weights imagenet", "--model.weights {resnet_state}"),  # no download in tests: a state-dict FILE
    (r"configs/", "{repo}/configs/"),
    (r"photos\.zip", "{zip}"),
    (r"photos/", "{folder}/"),
    (r"pixels\.csv", "{csv}"),
    (r"photo\.jpg", "{image}"),
    (r"shots/", "{folder}/"),
    (r"more/\*\*/\*\.png", "{folder}/**/*.png"),
]

# flags that keep each command quick, appended when the command does not give them
FAST_FLAGS: dict[str, list[str]] = {
    "train": ["--epochs", "1"],
    "lr-find": ["--steps", "20", "--epochs", "1"],  # 20: lr-find's minimum
}

# README commands a test cannot run -> why (matched as a prefix of the command after step 1)
NOT_RUN: dict[str, str] = {
    "deepfit serve": "a long-running HTTP server; tests/test_serve*.py start and stop it",
    "deepfit train --data fashion-mnist --log": "writes TensorBoard and MLflow stores; the tracking tests cover --log",
    "deepfit train ...": "'...' stands for any train flags; the tracking and training-trick tests cover these options",
    "deepfit train --data houses.csv": "needs a tiny houses.csv placeholder (extend SUBSTITUTIONS); tests/test_regression.py covers CSVs",
    "deepfit predict runs/<name> rows.csv": "needs a regression run and rows.csv (extend SUBSTITUTIONS); tests/test_regression.py covers it",
}


def readme_commands(text: str) -> list[str]:
    """The `deepfit ...` lines of the ```bash blocks, continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("deepfit ") or line == "deepfit":
                commands.append(simplify(line))
    return commands


def simplify(command: str) -> str:
    """Drop optional [...] parts and keep the first of a|b|c alternatives."""
    command = re.sub(r"\s*\[[^\]]*\]", "", command)
    return re.sub(r"(?<![\w/'])([\w.-]+)(\|[\w.-]+)+", r"\1", command)


def runnable(command: str, places: dict[str, str]) -> list[str]:
    for pattern, replacement in SUBSTITUTIONS:
        command = re.sub(pattern, replacement, command)
    args = shlex.split(command.format(**places))[1:]
    for flag, value in ((flag, value) for name, flags in FAST_FLAGS.items() if args[:1] == [name] for flag, value in pairs(flags)):
        if flag not in args:
            args += [flag, value]
    return args


def pairs(flags: list[str]) -> list[tuple[str, str]]:
    return list(zip(flags[::2], flags[1::2], strict=True))


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def test_the_readme_shows_commands_and_not_run_entries_are_current() -> None:
    assert len(COMMANDS) >= 15
    for prefix in NOT_RUN:
        assert any(c.startswith(prefix) for c in COMMANDS), f"NOT_RUN entry {prefix!r} is no longer in README.md"
    assert simplify("deepfit show curves|samples RUN [--image PATH]") == "deepfit show curves RUN"
    assert simplify("deepfit export runs/<name> --format onnx|torchscript") == "deepfit export runs/<name> --format onnx"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny stand-ins for every README placeholder, and two trained runs."""
    import torch
    from torchvision.models import resnet18

    root = tmp_path_factory.mktemp("readme")
    datasets = root / "datasets"
    for name in ("mnist", "fashion-mnist"):
        write_tiny_idx(datasets / name, train=60, test=20, side=28, compress=True)
    folder = image_folder(root / "photos")
    archive = root / "photos.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for file in sorted(folder.rglob("*.png")):
            handle.write(file, file.relative_to(folder.parent))
    rng = np.random.default_rng(0)
    rows = np.concatenate([np.arange(20)[:, None] % 10, rng.integers(0, 256, (20, 784))], axis=1)
    np.savetxt(root / "pixels.csv", rows, fmt="%d", delimiter=",")
    torch.save(resnet18().state_dict(), root / "resnet18.pt")
    places = {
        "datasets": str(datasets), "folder": str(folder), "zip": str(archive), "csv": str(root / "pixels.csv"),
        "image": str(next(folder.rglob("*.png"))), "repo": str(REPO), "resnet_state": str(root / "resnet18.pt"),
        "run": str(root / "runs" / "tiny"), "resnet_run": str(root / "runs" / "resnet"),
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEEPFIT_DATASETS", str(datasets))
        patch.chdir(root)
        common = ["--data", "mnist", "--epochs", "1", "--no-progress"]
        assert main(["train", *common, "--model", "cnn_bn", "--out", places["run"]]) == 0
        assert main(["train", *common, "--model", "resnet18", "--out", places["resnet_run"]]) == 0
    return places


def image_folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for name in ("ants", "bees"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow  # about 9 minutes on the shared 2-core machine: resnet18 runs on the digits demo data
@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_runs(
    command: str, workspace: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if any(command.startswith(prefix) for prefix in NOT_RUN):
        pytest.skip(next(reason for prefix, reason in NOT_RUN.items() if command.startswith(prefix)))
    monkeypatch.setenv("DEEPFIT_DATASETS", workspace["datasets"])
    monkeypatch.chdir(tmp_path)
    args = runnable(command, workspace)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, f"deepfit {shlex.join(args)}\n{err}"
