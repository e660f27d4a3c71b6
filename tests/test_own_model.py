"""Issue 12, item 3: a run trained with your own nn.Module records it ('module:Class') and can be
used afterwards: the Python API takes the module back, the CLI rebuilds it from `--model.class`
(and only then imports it), and commands that need no model work regardless."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from deepfit.config import Config, set_value
from deepfit.errors import CheckpointError
from deepfit.fit import fit
from deepfit.predict import Predictor
from tests.conftest import write_tiny_idx

NET = """
from torch import nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(144, 16), nn.ReLU(), nn.Linear(16, 10))
    def forward(self, x):
        return self.body(x)
"""


@pytest.fixture
def own_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, type[torch.nn.Module], str]:
    import importlib

    import deepfit.models.user as user

    monkeypatch.setattr(user, "ALLOWED", set())  # nothing named yet in this test
    name = f"own_net_{tmp_path.name.replace('-', '_')}"  # a fresh module per test
    (tmp_path / f"{name}.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    net_class = importlib.import_module(name).Net
    config = Config()
    data = write_tiny_idx(tmp_path / "idx", train=80, test=20)
    for key, value in {
        "data.name": "mnist",
        "data.dir": str(data),
        "train.epochs": 1,
        "train.progress": False,
        "train.out": str(tmp_path / "run"),
    }.items():
        set_value(config, key, value)
    fit(config, model=net_class())
    return tmp_path / "run", net_class, f"{name}:Net"


def test_the_run_records_the_users_class_and_the_api_takes_the_module_back(own_run) -> None:  # type: ignore[no-untyped-def]
    run, net_class, class_path = own_run
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert (saved["name"], saved["class_path"]) == ("custom", class_path)
    with pytest.raises(CheckpointError, match=f"pass --model.class {class_path}"):
        Predictor.from_checkpoint(run)  # never imports code because a checkpoint names it
    predictor = Predictor.from_checkpoint(run, model=net_class())
    image = torch.randint(0, 256, (1, 12, 12), dtype=torch.uint8)
    assert predictor.predict(image)[0].label in predictor.classes


def test_the_cli_rebuilds_it_only_from_a_named_class(cli, own_run) -> None:  # type: ignore[no-untyped-def]
    run, _, class_path = own_run
    curves = cli("show", "curves", str(run))  # needs no model
    assert curves.code == 0, curves.err
    refused = cli("evaluate", str(run))
    assert refused.code == 2 and len(refused.err.strip().splitlines()) == 1 and f"--model.class {class_path}" in refused.err
    evaluated = cli("evaluate", str(run), "--model.class", class_path)
    assert evaluated.code == 0, evaluated.err
    resumed = cli("train", "--resume", str(run), "--epochs", "2", "--no-progress", "--model.class", class_path)
    assert resumed.code == 0, resumed.err
    assert "resuming" in resumed.out and "test_acc" in resumed.out


def test_fit_resumes_a_run_of_your_own_module(own_run) -> None:  # type: ignore[no-untyped-def]
    from deepfit.checkpoint import load_checkpoint
    from deepfit.config import config_from_dict

    run, net_class, _ = own_run
    config = config_from_dict(load_checkpoint(run / "checkpoints" / "last.pt")["config"])
    config.train.epochs = 2
    result = fit(config, model=net_class(), resume=run)
    assert isinstance(result.model, net_class) and len(result.history) == 2


def test_report_and_show_all_draw_what_needs_no_model(cli, own_run) -> None:  # type: ignore[no-untyped-def]
    run, _, class_path = own_run
    report = cli("report", str(run))
    assert report.code == 0, report.err
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "id='curves'" in page and "id='samples'" in page  # no model needed for these
    assert "id='predictions'" not in page and f"pass --model.class {class_path}" in page
    shown = cli("show", "all", str(run))
    assert shown.code == 0, shown.err
    assert (run / "plots" / "curves.png").is_file() and (run / "plots" / "samples.png").is_file()
    assert len(shown.err.strip().splitlines()) == 1 and "predictions, confusion, mistakes" in shown.err
    named = cli("report", str(run), "--model.class", class_path)
    assert named.code == 0, named.err
    assert "id='predictions'" in (run / "report.html").read_text(encoding="utf-8")
