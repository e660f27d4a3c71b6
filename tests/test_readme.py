"""Every `deepfit ...` command line in README.md's ```bash blocks runs, on tiny data, so the README
cannot drift from the CLI.

How it works (extend the tables when you add README commands):
1. `readme_commands()` takes each line of a bash block that starts with `deepfit ` (backslash
   continuations joined, `# comments` dropped). Optional `[...]` parts are dropped and of
   `a|b|c` alternatives the first is kept.
2. SUBSTITUTIONS replace placeholders (runs/<name>, ~/data/..., photos.zip, ...) with tiny files
   made in tmp_path by `workspace()`; named datasets (mnist, fashion-mnist) are tiny IDX sets
   found through $DEEPFIT_DATASETS. `runs/<name>` is a run of the README section's task: an
   image run, a regression run under "## Regression", a karate run under "## Node
   classification" (SECTION_RUNS). `deepfit train ...` (any train flags) runs with none.
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
from tests.conftest import DATASETS, REPO, write_tiny_idx

README = REPO / "README.md"

# placeholder in the README -> what the test puts there ({name} fields are filled by workspace())
SUBSTITUTIONS: list[tuple[str, str]] = [
    (r"runs/<earlier>", "{resnet_run}"),  # --init-from for resnet18 fine-tuning: an earlier resnet18 run
    (r"^deepfit train \.\.\.", "deepfit train"),  # '...' stands for any train flags: none
    (r"~/data/(mnist|fashion-mnist)", r"{datasets}/\1"),
    (r"--model\.weights imagenet", "--model.weights {resnet_state}"),  # no download in tests: a state-dict FILE
    (r"configs/", "{repo}/configs/"),
    (r"photos\.zip", "{zip}"),
    (r"photos/", "{folder}/"),
    (r"pixels\.csv", "{csv}"),
    (r"photo\.jpg", "{image}"),
    (r"shots/", "{folder}/"),
    (r"more/\*\*/\*\.png", "{folder}/**/*.png"),
    (r"houses\.csv", "{houses}"),
    (r"rows\.csv", "{rows}"),
    (r"edges\.csv", "{edges}"),
    (r"nodes\.csv", "{nodes}"),
    (r"my-graph/", "{graph_folder}/"),
    (r"\.\./shared/datasets/planetoid", "{planetoid}"),
]

# README section heading (its start) -> the run that `runs/<name>` stands for there
SECTION_RUNS: dict[str, str] = {"Regression": "{regression_run}", "Node classification": "{node_run}"}

# flags that keep each command quick, appended when the command does not give them
FAST_FLAGS: dict[str, list[str]] = {
    "train": ["--epochs", "1"],
    "lr-find": ["--steps", "20"],  # 20: lr-find's minimum
}

# README commands a test cannot run -> why (matched as a prefix of the command after step 1)
NOT_RUN: dict[str, str] = {
    "deepfit serve": "a long-running HTTP server; tests/serve/ start and stop it",
    "deepfit train --config configs/cifar10-jpg-gpu.yaml --data cifar10-jpg.zip --devices 4": (
        "4 ranks of CIFAR-10; tests/test_distributed_slow.py runs --devices 2 on the CPU"
    ),
}


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(section heading, command) for the `deepfit ...` lines of the ```bash blocks, continuations
    joined, comments dropped."""
    commands = []
    for section in re.split(r"\n(?=## )", text):
        heading = section.splitlines()[0].lstrip("# ").strip()
        for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line.startswith("deepfit ") or line == "deepfit":
                    commands.append((heading, simplify(line)))
    return commands


def simplify(command: str) -> str:
    """Drop optional [...] parts and keep the first of a|b|c alternatives."""
    command = re.sub(r"\s*\[[^\]]*\]", "", command)
    return re.sub(r"(?<![\w/'])([\w.-]+)(\|[\w.-]+)+", r"\1", command)


def runnable(section: str, command: str, places: dict[str, str]) -> list[str]:
    run = next((run for start, run in SECTION_RUNS.items() if section.startswith(start)), "{run}")
    command = command.replace("runs/<name>", run)
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


def test_every_config_the_readme_names_exists() -> None:
    named = set(re.findall(r"configs/[\w.-]+\.yaml", README.read_text(encoding="utf-8")))
    assert named and all((REPO / path).is_file() for path in named), sorted(p for p in named if not (REPO / p).is_file())


def test_the_readme_shows_commands_and_not_run_entries_are_current() -> None:
    assert len(COMMANDS) >= 15
    for prefix in NOT_RUN:
        assert any(c.startswith(prefix) for _, c in COMMANDS), f"NOT_RUN entry {prefix!r} is no longer in README.md"
    assert {section for section, _ in COMMANDS} >= {"Regression: predict a number from table rows", "The command line"}
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
    houses, rows = table_files(root)
    edges, nodes = graph_files(root / "my-graph")
    places = {
        "datasets": str(datasets), "folder": str(folder), "zip": str(archive), "csv": str(root / "pixels.csv"),
        "image": str(next(folder.rglob("*.png"))), "repo": str(REPO), "resnet_state": str(root / "resnet18.pt"),
        "run": str(root / "runs" / "tiny"), "resnet_run": str(root / "runs" / "resnet"),
        "houses": str(houses), "rows": str(rows), "edges": str(edges), "nodes": str(nodes),
        "graph_folder": str(root / "my-graph"), "planetoid": str(DATASETS / "planetoid"),
        "regression_run": str(root / "runs" / "houses"), "node_run": str(root / "runs" / "karate"),
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEEPFIT_DATASETS", str(datasets))
        patch.chdir(root)
        common = ["--data", "mnist", "--epochs", "1", "--no-progress"]
        assert main(["train", *common, "--model", "cnn_bn", "--out", places["run"]]) == 0
        assert main(["train", *common, "--model", "resnet18", "--out", places["resnet_run"]]) == 0
        assert main(["train", "--data", str(houses), "--target", "price", "--epochs", "5", "--out", places["regression_run"]]) == 0
        assert main(["train", "--data", "karate", "--epochs", "20", "--out", places["node_run"]]) == 0
    return places


def table_files(root: Path) -> tuple[Path, Path]:
    """houses.csv (size, rooms, city, price) and rows.csv: the same columns without the price."""
    rng = np.random.default_rng(2)
    size, rooms = rng.uniform(40, 200, 60).round(1), rng.integers(1, 6, 60)
    city = rng.choice(["Seoul", "Busan"], 60)
    price = (3 * size + 20 * rooms + rng.normal(0, 10, 60)).round(1)
    lines = ["size,rooms,city,price", *(f"{a},{b},{c},{d}" for a, b, c, d in zip(size, rooms, city, price, strict=True))]
    (root / "houses.csv").write_text("\n".join(lines) + "\n")
    (root / "rows.csv").write_text("size,rooms,city\n120.5,3,Seoul\n64.0,2,Busan\n")
    return root / "houses.csv", root / "rows.csv"


def graph_files(folder: Path) -> tuple[Path, Path]:
    """A ring of 12 nodes in two labelled halves (two nodes unlabelled), as edges.csv and nodes.csv."""
    folder.mkdir(parents=True)
    edges = [f"{i},{(i + 1) % 12}" for i in range(12)] + ["0,6"]
    (folder / "edges.csv").write_text("source,target\n" + "\n".join(edges) + "\n")
    labels = ["left" if i < 6 else "right" for i in range(12)]
    labels[3] = labels[9] = ""
    (folder / "nodes.csv").write_text("id,label\n" + "\n".join(f"{i},{label}" for i, label in enumerate(labels)) + "\n")
    return folder / "edges.csv", folder / "nodes.csv"


def image_folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for name in ("ants", "bees"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow  # about 10 minutes on the 2-core machine: resnet18 runs on the digits demo data
@pytest.mark.parametrize(("section", "command"), COMMANDS, ids=[command for _, command in COMMANDS])
def test_every_readme_command_runs(
    section: str,
    command: str,
    workspace: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if any(command.startswith(prefix) for prefix in NOT_RUN):
        pytest.skip(next(reason for prefix, reason in NOT_RUN.items() if command.startswith(prefix)))
    if "planetoid" in command and not (DATASETS / "planetoid").is_dir():
        pytest.skip(f"the Planetoid Cora files are not in {DATASETS} (set DEEPFIT_DATASETS)")
    monkeypatch.setenv("DEEPFIT_DATASETS", workspace["datasets"])
    monkeypatch.chdir(tmp_path)
    args = runnable(section, command, workspace)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, f"deepfit {shlex.join(args)}\n{err}"
