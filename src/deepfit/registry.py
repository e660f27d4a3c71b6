"""One small strict name -> builder registry, shared by models, datasets, optimizers, schedulers, losses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from deepfit.errors import ConfigError, did_you_mean

T = TypeVar("T", bound=Callable[..., object])


class Registry(Generic[T]):
    """Maps names to builder functions; unknown names raise an error listing the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            return fn

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(self.names())
            hint = did_you_mean(name, self.names())
            raise ConfigError(f"unknown {self.kind} {name!r}{hint}; valid: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> list[tuple[str, str]]:
        """(name, one-line description) of every entry: the first sentence of its builder's docstring."""
        return [(name, first_sentence(self._items[name].__doc__ or "")) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._items


def first_sentence(doc: str) -> str:
    """The docstring's first paragraph on one line, up to its first full stop (a summary that a
    line break cut in two is joined again)."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]
