"""CSV files as spreadsheets save them: a table, a node table and an edge list written
comma-separated, semicolon-separated with decimal commas (European locales) and tab-separated
read as the same data; line numbers in messages are the file's own."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from deepfit.config import DataConfig
from deepfit.csvtext import csv_lines, decimal_point, delimiter_of
from deepfit.errors import DataError
from deepfit.graph.csvgraph import load_csv_graph
from deepfit.regression.sources import load_table

HOUSES = [["area", "rooms", "city", "price"]] + [
    [f"{40 + 1.5 * i}", f"{1 + i % 4}", "north" if i % 3 else "south, old town", f"{100 + 2.25 * i - 0.5 * (i % 4)}"] for i in range(30)
]


def write(path: Path, rows: list[list[str]], delimiter: str, *, decimal: str = ".") -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, delimiter=delimiter).writerows([[cell.replace(".", decimal) for cell in row] for row in rows])
    return path


@pytest.mark.parametrize(
    ("line", "delimiter"),
    [
        ("a,b,c", ","),
        ("a;b;c", ";"),
        ("a\tb\tc", "\t"),
        ("a|b|c", "|"),
        ("a", ","),
        ("", ","),
        ("a;b,c", ","),
        ("\n\na;b\n1,5;2", ";"),
        ('"price, EUR";rooms', ";"),
        ('"a;b",c', ","),
        ('"x, y"\t"z"', "\t"),
    ],
)
def test_the_delimiter_is_read_off_the_first_line(line: str, delimiter: str) -> None:
    assert delimiter_of(line) == delimiter


@pytest.mark.parametrize(("cell", "read"), [("412,7", "412.7"), ("-0,25", "-0.25"), (" 3,0 ", " 3.0 "), ("1,2,3", "1,2,3"), ("a,5", "a,5")])
def test_only_a_decimal_comma_becomes_a_point(cell: str, read: str) -> None:
    assert decimal_point(cell) == read


def test_a_table_reads_the_same_from_comma_semicolon_and_tab_files(tmp_path: Path) -> None:
    files = {
        "comma": write(tmp_path / "comma.csv", HOUSES, ","),
        "semicolon": write(tmp_path / "semicolon.csv", HOUSES, ";", decimal=","),
        "tab": write(tmp_path / "tab.csv", HOUSES, "\t"),
        "tsv": write(tmp_path / "houses.tsv", HOUSES, "\t"),
    }
    tables = {name: load_table(DataConfig(name=str(path), target="price", categorical="onehot")) for name, path in files.items()}
    comma = tables["comma"]
    assert comma.feature_names == ["area", "rooms", "city=north", "city=south, old town"]
    assert comma.target[1] == pytest.approx(102.25 - 0.5)
    for name in ("semicolon", "tab", "tsv"):
        assert tables[name].feature_names == comma.feature_names, name
        assert (tables[name].features == comma.features).all() and (tables[name].target == comma.target).all(), name


def test_a_bad_line_is_named_by_its_line_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gaps.csv"
    path.write_text("a;b;y\n1;2;3\n\n\n4;5\n")
    with pytest.raises(DataError, match=r"line 5 has 2 fields, the header 3"):
        load_table(DataConfig(name=str(path), target="y"))
    assert [number for number, _ in csv_lines(path.read_text())] == [1, 2, 5]


def test_a_graph_reads_the_same_from_semicolon_files_with_decimal_commas(tmp_path: Path) -> None:
    nodes = [["id", "label", "f1", "f2"]] + [[f"n{i}", "ab"[i % 2], f"{i * 0.5}", f"{1 - i * 0.25}"] for i in range(12)]
    edges = [["source", "target"]] + [[f"n{i}", f"n{(i + 1) % 12}"] for i in range(12)]
    graphs = []
    for delimiter, decimal in ((",", "."), (";", ",")):
        folder = tmp_path / ("comma" if delimiter == "," else "semicolon")
        folder.mkdir()
        node_file, edge_file = write(folder / "nodes.csv", nodes, delimiter, decimal=decimal), write(folder / "edges.csv", edges, delimiter)
        graphs.append(load_csv_graph(edge_file, node_file, val_fraction=0.2, test_fraction=0.2, seed=0))
    comma, semicolon = graphs
    assert comma.features[3].tolist() == [1.5, 0.25]
    assert torch.equal(semicolon.features, comma.features) and torch.equal(semicolon.edge_index, comma.edge_index)
    assert torch.equal(semicolon.labels, comma.labels) and semicolon.node_ids == comma.node_ids
