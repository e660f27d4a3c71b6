"""Terminal columns: the display width of text, where East Asian wide characters (Hangul, kanji)
take two cells, so tables with such class names stay aligned."""

from __future__ import annotations

import unicodedata


def display_width(text: str) -> int:
    """Terminal cells `text` takes: 2 for wide and full-width characters, 0 for combining marks."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def pad(text: str, width: int) -> str:
    """`text` left-aligned in `width` terminal cells (str.ljust counts characters, not cells)."""
    return text + " " * max(0, width - display_width(text))


def pad_left(text: str, width: int) -> str:
    """`text` right-aligned in `width` terminal cells."""
    return " " * max(0, width - display_width(text)) + text
