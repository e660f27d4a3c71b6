"""The registry: duplicates raise, unknown names list the valid ones."""

from __future__ import annotations

import pytest

from deepfit.errors import ConfigError
from deepfit.registry import Registry


def test_register_get_names() -> None:
    things: Registry[object] = Registry("thing")

    @things.register("b")
    def b() -> int:
        return 2

    @things.register("a")
    def a() -> int:
        return 1

    assert things.names() == ["a", "b"]
    assert things.get("b") is b
    assert "a" in things


def test_duplicate_and_unknown() -> None:
    things: Registry[object] = Registry("thing")
    things.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        things.register("a")(lambda: 2)
    with pytest.raises(ConfigError, match="unknown thing 'z'; valid: a"):
        things.get("z")
