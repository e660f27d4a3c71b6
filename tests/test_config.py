"""Config: defaults < YAML < flags, typed coercion, and errors that name the key and the choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepfit.config import Config, config_from_dict, load_config, parse_duration, set_value, validate
from deepfit.errors import ConfigError


def test_dotted_override_coerces_to_the_field_type() -> None:
    config = Config()
    set_value(config, "optim.lr", "0.01")
    set_value(config, "data.skip-bad", "true")
    set_value(config, "data.image-size", "64")
    set_value(config, "model.hidden", "256,128")
    assert config.optim.lr == pytest.approx(0.01)
    assert config.data.skip_bad is True
    assert config.data.image_size == 64
    assert config.model.hidden == [256, 128]


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("optim.lr", "abc", "optim.lr must be a number"),
        ("train.epochs", "2.5", "train.epochs must be an integer"),
        ("data.skip_bad", "maybe", "data.skip_bad must be true or false"),
        ("train.device", "tpu", "auto, cpu, cuda, mps"),
        ("optim.nope", "1", "unknown config key"),
        ("nosection.lr", "1", "unknown config key"),
    ],
)
def test_bad_values_name_the_key(key: str, value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        set_value(Config(), key, value)


@pytest.mark.parametrize(("key", "meant"), [("optim.learning_rate", "optim.lr"), ("model.pretrained", "model.weights")])
def test_unknown_key_lists_the_valid_ones(key: str, meant: str) -> None:
    with pytest.raises(ConfigError) as err:
        set_value(Config(), key, "1")
    assert f"did you mean {meant}?" in str(err.value)


def test_yaml_overrides_defaults_and_unknown_keys_fail(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("optim:\n  name: sgd\n  lr: 0.05\ntrain:\n  epochs: 3\n")
    config = load_config(good)
    assert (config.optim.name, config.optim.lr, config.train.epochs) == ("sgd", 0.05, 3)
    assert config.data.name == Config().data.name
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=f"^config file {bad}: unknown config key 'train.epochz'; did you mean train.epochs"):
        load_config(bad)
    bad.write_text("- train\n- model\n")
    with pytest.raises(ConfigError, match=f"^config file {bad}: config must be a mapping of sections"):
        load_config(bad)


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError) as raised:
        load_config(broken)
    message = str(raised.value)  # PyYAML's report folded into the one line the CLI prints
    assert (
        message
        == f"config file {broken} is not valid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)"
    )
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_a_folder_given_as_config_is_named_and_a_runs_folder_gets_its_two_flags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder; --config takes a YAML file"):
        load_config(tmp_path)
    (tmp_path / "config.yaml").write_text("train:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path)
    assert str(raised.value) == (
        f"config file {tmp_path} is a run's folder: continue it with --resume {tmp_path}, or train its config"
        f" again with --config {tmp_path / 'config.yaml'} --out NEW"
    )


def test_round_trip_through_a_dict() -> None:
    config = Config()
    set_value(config, "sched.name", "onecycle")
    set_value(config, "model.weights", "none")
    again = config_from_dict(config.to_dict())
    assert again == config
    assert again.model.weights is None


@pytest.mark.parametrize(("key", "value"), [("optim.lr", "-1"), ("data.val_fraction", "0.95"), ("train.epochs", "0")])
def test_validate_rejects_out_of_range_values(key: str, value: str) -> None:
    config = Config()
    set_value(config, key, value)
    with pytest.raises(ConfigError):
        validate(config)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [  # each trained before without a word (a negative max_lr or min_lr climbed the loss), or with a traceback (betas)
        ("data.num_workers", "-1", "data.num_workers must be 0 (decode in the main process) or a number of processes"),
        ("data.memory_budget_mb", "-5", "data.memory_budget_mb must be 0 or more MiB"),
        ("train.threads", "-2", "train.threads must be 0 (all cores) or a number of threads"),
        ("train.early_stop", "-1", "train.early_stop must be 0 (never) or a number of epochs"),
        ("train.clip_grad", "-1", "train.clip_grad must be 0 (off) or a positive gradient norm"),
        ("optim.weight_decay", "-0.1", "optim.weight_decay must be 0 or positive"),
        ("optim.momentum", "1.5", "optim.momentum must be in [0, 1)"),
        ("optim.betas", "0.9", "optim.betas must be two numbers in [0, 1), e.g. 0.9,0.999; got 0.9"),
        ("optim.betas", "0.9,1.0", "optim.betas must be two numbers"),
        ("sched.max_lr", "-1", "sched.max_lr must be positive"),
        ("sched.min_lr", "-1", "sched.min_lr must be 0 or positive"),
        ("sched.warmup_epochs", "-1", "sched.warmup_epochs must be 0"),
        ("sched.step_size", "0", "sched.step_size must be at least 1 epoch"),
        ("sched.milestones", "-3", "sched.milestones must be epochs from 1 on"),
        ("sched.gamma", "0", "sched.gamma must be positive"),
        ("sched.pct_start", "1.5", "sched.pct_start must be in 0..1"),
        ("sched.start_factor", "-1", "sched.start_factor and sched.end_factor must be 0 or more"),
        ("sched.patience", "-1", "sched.patience must be 0 or more epochs"),
        ("sched.factor", "0", "sched.factor must be between 0 and 1"),
        ("data.node_test_fraction", "1", "data.node_test_fraction must be between 0 and 1"),
    ],
)
def test_validate_names_each_out_of_range_setting(key: str, value: str, message: str) -> None:
    config = Config()
    validate(config)  # the defaults pass
    set_value(config, key, value)
    with pytest.raises(ConfigError) as raised:
        validate(config)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize(("text", "seconds"), [("90", 90.0), ("90s", 90.0), ("5m", 300.0), ("1.5h", 5400.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_parse_duration_rejects_garbage() -> None:
    with pytest.raises(ConfigError, match="time_limit"):
        parse_duration("soon")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "line", "--train.ema", "0.99"], "--train.ema (image runs): not used by a regression run; leave it out"),
        (
            ["--data", "line", "--init-from", "runs/old", "--data.sampler", "balanced"],
            "--data.sampler (image runs), --model.init-from (image runs): not used by a regression run; leave them out",
        ),
        (["--data", "line", "--loss.label-smoothing", "0.1"], "--loss.label-smoothing (image/node runs): not used by a regression run"),
        (["--data", "karate", "--data.batch-size", "8"], "--data.batch-size (image/regression runs): not used by a node run"),
        (["--data", "karate", "--train.tta", "flip"], "--train.tta (image runs): not used by a node run"),
        (["--data", "digits", "--data.test-fraction", "0.3"], "--data.test-fraction (regression runs): not used by an image run"),
        (["--data", "line", "--data.nodes", "nodes.csv"], "--data.nodes (node runs): not used by a regression run"),
        (
            ["--data", "digits", "--data.nodes", "nodes.csv"],
            "unknown graph 'digits'; valid: cora, karate, an edge-list .csv",
        ),  # a node table implies a node run
    ],
)
def test_an_option_the_task_does_not_read_is_refused_not_ignored(cli, tmp_path: Path, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    result = cli("train", *args, "--epochs", "1", "--no-progress", "--out", "run")
    assert result.code == 2 and message in result.err and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_every_task_specific_option_is_a_config_field_and_the_defaults_pass() -> None:
    from deepfit.config import OPTION_TASKS, refuse_unused

    blank = Config()
    for key, tasks in OPTION_TASKS.items():
        section, field = key.split(".")
        assert hasattr(getattr(blank, section), field), key
        assert set(tasks) <= {"image", "regression", "node"}, key
    for task in ("image", "regression", "node"):
        refuse_unused(blank, task)  # nothing set: nothing refused
    from deepfit.graph import node_defaults
    from deepfit.regression import default_config

    refuse_unused(default_config(), "regression")  # each task's own defaults are options it reads
    refuse_unused(node_defaults(), "node")
