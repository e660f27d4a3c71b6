"""The exceptions deepfit raises for problems a user can fix; the CLI turns each into one line."""

from __future__ import annotations


class DeepfitError(Exception):
    """A problem with the user's input (file, flag, config, data): exit code 2, no traceback."""

    exit_code = 2


class ConfigError(DeepfitError):
    """A config key or value that is unknown or invalid."""


class DataError(DeepfitError):
    """A dataset that cannot be found or read."""


class CheckpointError(DeepfitError):
    """A checkpoint that is missing, corrupt, unsafe or does not fit its architecture."""


class NonFiniteError(Exception):
    """Training produced a NaN or infinite loss or gradient; the run stops without saving."""

    exit_code = 3


class StopRequested(Exception):
    """A signal (SIGINT/SIGTERM) or the wall-time budget asked training to stop cleanly."""

    exit_code = 130


def did_you_mean(word: str, options: list[str] | tuple[str, ...], *, prefix: str = "") -> str:
    """' (did you mean --optim.lr?)' for the closest option (difflib, ignoring case: CNN_BN finds
    cnn_bn), or '' when none is close."""
    import difflib  # light, but only needed on the error path

    lowered = {option.lower(): option for option in options}
    matches = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{lowered[matches[0]]}?)" if matches else ""


def first_line(err: BaseException, *, named: bool = False, limit: int | None = None) -> str:
    """The first line of an error's message (with `named`, after its type: 'RuntimeError: ...';
    with `limit`, cut to that many characters), for a one-line message built on it; its type's
    name when it says nothing."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0][:limit]
    return f"{type(err).__name__}: {line}" if named else line


def moved_data_message(name: str) -> str:
    """An absolute data path (how a run records its data) with nothing there: where to give its new place."""
    return (
        f"no folder or file at {name} (moved or deleted?); a run whose data moved takes its new place with"
        " train --resume RUN --data NEW, evaluate RUN --data NEW or show KIND RUN --data NEW"
    )
