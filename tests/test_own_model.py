"""Issue 12, item 3: a run trained with your own nn.Module records it ('module:Class') and can be
used afterwards: the Python API takes the module back, the CLI rebuilds it from `--model.class`
(and only then imports it), and commands that need no model work regardless."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from deepfit.config import Config, set_value
from deepfit.errors import CheckpointError, ConfigError
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


class Flat(torch.nn.Module):
    """One linear layer over the flattened image: `inputs` pixels to `outputs` scores."""

    inputs, outputs = 144, 10

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(self.inputs, self.outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Pair(Flat):
    """Logits and something else: a tuple."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.body(x), x.mean()


class FiveClasses(Flat):
    outputs = 5


class ForMnist(Flat):
    """Made for 28x28 images, given 12x12 ones."""

    inputs = 784


class Asserts(ForMnist):
    """Checks its input as a bare assert does outside pytest (which adds a message): no message."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 28:
            raise AssertionError
        return self.body(x)


class Frozen(Flat):
    def __init__(self) -> None:
        super().__init__()
        self.body.requires_grad_(False)


BAD_MODULES = [
    (Pair, r"returns a tuple; deepfit trains on a tensor of logits \(2, 10\): return it alone"),
    (FiveClasses, r"returns shape \(2, 5\) for a batch of 2 1x12x12 images; deepfit needs \(2, 10\)"),
    (ForMnist, r"fails on a batch of 1x12x12 images \(the data's shape\): RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    (Asserts, r"fails on a batch of 1x12x12 images \(the data's shape\): AssertionError$"),
    (Frozen, r"has no trainable parameters"),
]


def tiny_config(tmp_path: Path) -> Config:
    """One epoch on 40 tiny MNIST-like images, into tmp_path/run."""
    config = Config()
    for key, value in {"data.name": "mnist", "data.dir": str(write_tiny_idx(tmp_path / "idx", train=40, test=10)),
                       "train.epochs": 1, "train.progress": False, "train.out": str(tmp_path / "run")}.items():  # fmt: skip
        set_value(config, key, value)
    return config


@pytest.mark.parametrize(("module", "message"), BAD_MODULES, ids=[m[0].__name__ for m in BAD_MODULES])
def test_a_module_that_cannot_train_on_the_data_is_one_line_before_the_run_folder(
    tmp_path: Path, module: type[torch.nn.Module], message: str
) -> None:
    config = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match=f"your model tests.test_own_model:{module.__name__} {message}"):
        fit(config, model=module())
    assert not (tmp_path / "run").exists()


def test_trying_a_module_leaves_its_statistics_mode_and_the_random_state_as_they_were() -> None:
    from deepfit.data import DataBundle, ImageSet
    from deepfit.fitparts import require_logits

    images = ImageSet(torch.zeros(4, 1, 12, 12, dtype=torch.uint8), torch.arange(4) % 2)
    bundle = DataBundle(images, None, None, ["a", "b"], (0.5,), (0.25,), flip_ok=False, source="s", origin="o")
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5), torch.nn.Flatten(), torch.nn.Linear(400, 2)
    )
    model[1].running_mean.fill_(0.3)
    before = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    require_logits(model, bundle, torch.device("cpu"), channels_last=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True)) and model.training
    model.eval()
    require_logits(model, bundle, torch.device("cpu"), channels_last=False)
    assert not model.training  # the mode it was in
    assert torch.equal(rng, torch.get_rng_state())


class AuxInTraining(Flat):
    """Inception-style: logits alone in evaluation, logits and an auxiliary head in training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits = self.body(x)
        return (logits, logits.detach()) if self.training else logits


def test_a_module_with_more_outputs_in_training_stops_in_one_line_at_its_first_batch(tmp_path: Path) -> None:
    """It passes the evaluation-mode check before the run; its first training batch used to end
    in cross_entropy's TypeError ('must be Tensor, not tuple')."""
    config = tiny_config(tmp_path)
    with pytest.raises(
        ConfigError, match=r"^your model AuxInTraining returns a tuple in training mode; .* return it alone in training too$"
    ):
        fit(config, model=AuxInTraining())


@pytest.mark.parametrize(("given", "example"), [("pkg.models.Net", "pkg.models:Net"), ("Net", "my_models:Net"), (":Net", "my_models:Net")])
def test_a_class_path_without_its_colon_is_refused_with_the_colon_form(cli, given: str, example: str) -> None:  # type: ignore[no-untyped-def]
    """'pkg.models.Net' (the dotted form other tools take) used to fail as a module that cannot be imported."""
    result = cli("train", "--model.class", given, "--epochs", "1")
    assert result.code == 2
    assert result.err.strip() == f"deepfit: error: model.class takes module:Class, e.g. --model.class {example}; got {given!r}"


def test_a_model_no_class_name_can_rebuild_says_to_pass_the_model(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An nn.Sequential, a class made inside a function: the CLI advised `--model.class
    torch.nn.modules.container:Sequential`, which built an empty Sequential."""

    class Local(Flat):
        pass

    cases = [
        (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 10)), "torch's own Sequential (Sequential() has none of its layers)"),
        (Local(), "defined inside a function"),
    ]
    for i, (model, reason) in enumerate(cases):
        config = tiny_config(tmp_path)
        config.train.out = str(tmp_path / f"run{i}")
        fit(config, model=model)
        class_path = yaml.safe_load((tmp_path / f"run{i}" / "config.yaml").read_text())["model"]["class_path"]
        refused = cli("evaluate", f"run{i}")
        assert refused.code == 2 and refused.err.strip() == (
            f"deepfit: error: run{i}/checkpoints/best.pt: cannot rebuild its model: {class_path} is {reason}, so deepfit"
            " cannot build it by name: pass the model itself in Python (model=..., as in Predictor.from_checkpoint(RUN,"
            " model=...)), or define its class in a module file and name it with --model.class module:Class"
        )
        assert cli("evaluate", f"run{i}", "--model.class", class_path).code == 2  # named: still not rebuildable
        assert Predictor.from_checkpoint(tmp_path / f"run{i}", model=model).classes  # the model itself: fine


def test_a_scripts_own_class_is_built_where_that_script_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """__main__:Net names the training script's class: a script that allows it gets it; where
    __main__ is another program (deepfit's command line, pytest), it is named as the script's."""
    import sys

    import deepfit.models.user as user

    monkeypatch.setattr(user, "ALLOWED", set())
    user.allow_model_class("__main__:OwnNet")
    with pytest.raises(ConfigError, match=r"^__main__:OwnNet is defined in the script that trained it, so deepfit cannot build it by name"):
        user.build_user_model("__main__:OwnNet")
    monkeypatch.setattr(sys.modules["__main__"], "OwnNet", Flat, raising=False)
    assert isinstance(user.build_user_model("__main__:OwnNet"), Flat)
