"""CSV text as people save it: comma-separated; or, from a spreadsheet set to a European locale,
semicolon-separated with decimal commas ("412,7"); or tab-separated. The delimiter is read off the
first line, so tables, node tables, edge lists and served CSV bodies parse the same way."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator

OTHER_DELIMITERS = ";\t|"
QUOTED = re.compile(r'"[^"]*"')
DECIMAL_COMMA = re.compile(r"\s*[+-]?\d+,\d+\s*")


def delimiter_of(text: str) -> str:
    """',' unless the first non-empty line has no comma but a ';', tab or '|' (the most frequent);
    a quoted name ("price, EUR") is not looked into."""
    first = QUOTED.sub("", next((line for line in text.splitlines() if line.strip()), ""))
    if "," in first:
        return ","
    counts = {delimiter: first.count(delimiter) for delimiter in OTHER_DELIMITERS}
    best = max(counts, key=lambda delimiter: counts[delimiter])
    return best if counts[best] else ","


def decimal_point(cell: str) -> str:
    """'412,7' -> '412.7'; any other cell as it is."""
    return cell.replace(",", ".") if DECIMAL_COMMA.fullmatch(cell) else cell


def csv_lines(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of each row that holds something, in the text's own delimiter; a
    semicolon-separated text's decimal commas become points. csv.Error names the line."""
    delimiter = delimiter_of(text)
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                yield reader.line_num, [decimal_point(cell) for cell in row] if delimiter == ";" else row
    except csv.Error as err:
        raise csv.Error(f"line {reader.line_num}: {err}") from None
