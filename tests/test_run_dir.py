"""The run folder every task starts in: --out, or runs/<data>-<model>-<date-time>[-n]."""

from __future__ import annotations

from datetime import datetime, tzinfo
from pathlib import Path

import pytest

from deepfit.checkpoint import new_run_dir
from deepfit.errors import ConfigError


def test_out_is_used_unless_it_already_holds_a_run(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    assert new_run_dir(str(out), data="mnist", model="cnn_bn") == out
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="already holds a run; use --resume"):
        new_run_dir(str(out), data="mnist", model="cnn_bn")


def test_default_name_drops_every_suffix_and_never_reuses_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deepfit.checkpoint

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Frozen:
            return cls(2026, 11, 26, 17, 30, 0)

    monkeypatch.setattr(deepfit.checkpoint, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    assert new_run_dir(None, data="data/houses.csv.gz", model="linear", make=False) == Path("runs/houses-linear-20261126-173000")
    assert not Path("runs").exists()  # a rank that only learns rank 0's name makes nothing
    # runs started in the same second (a sweep) each get a folder of their own, made as it is named
    folders = [new_run_dir(None, data="data/houses.csv.gz", model="linear") for _ in range(3)]
    assert folders == [Path(f"runs/houses-linear-20261126-173000{suffix}") for suffix in ("", "-2", "-3")]
    assert all(folder.is_dir() for folder in folders)


def test_out_with_files_of_its_own_is_refused_and_left_as_it_was(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A project folder holding its own config.yaml and metrics.csv had both written over by the run."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("mine: true\n")
    (project / "metrics.csv").write_text("a,b\n")
    result = cli("train", "--data", "digits", "--epochs", "1", "--out", str(project))
    assert result.code == 2
    assert result.err == (
        f"deepfit: error: --out {project} holds files that are not a deepfit run (config.yaml, metrics.csv); a run writes config.yaml,"
        " metrics.csv, checkpoints/ and plots/ there: give a new or empty folder\n"
    )
    assert sorted(p.name for p in project.iterdir()) == ["config.yaml", "metrics.csv"]
    assert (project / "config.yaml").read_text() == "mine: true\n"
    for folder in (tmp_path / "empty", tmp_path / "started"):  # new or empty; or a run that stopped before its first checkpoint
        folder.mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"\x00")  # hidden files do not count
    (tmp_path / "started" / ".lock").write_text("1 on host\n")
    (tmp_path / "started" / "config.yaml").write_text("train:\n  epochs: 1\n")
    assert new_run_dir(str(tmp_path / "empty"), data="d", model="m") == tmp_path / "empty"
    assert new_run_dir(str(tmp_path / "started"), data="d", model="m") == tmp_path / "started"
