"""`deepfit report`: one self-contained HTML file, checked by parsing it and by rendering it in
headless Chromium (skipped with the reason when no Chromium is installed)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepfit.history import read_metrics_csv
from deepfit.inspect import FIGURE_KINDS
from deepfit.report import write_report

TINY = ("--data", "mnist", "--epochs", "2", "--no-progress", "--data.batch-size", "32")


class Tags(HTMLParser):
    """Collects every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def parse(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Tags()
    parser.feed(page)
    return parser.tags


@pytest.fixture
def tiny_run(cli, tiny_idx: Path, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    assert cli("train", *TINY, "--data-dir", str(tiny_idx), "--model", "cnn_bn", "--out", "run").code == 0
    return tmp_path / "run"


def test_report_embeds_every_figure_and_links_nothing_outside(cli, tiny_run: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("report", str(tiny_run))
    assert result.code == 0, result.err
    path = Path(result.out.strip())
    assert path == tiny_run / "report.html"
    page = path.read_text(encoding="utf-8")
    tags = parse(page)
    images = [attrs for tag, attrs in tags if tag == "img"]
    assert sorted(str(a["alt"]) for a in images) == sorted(FIGURE_KINDS)
    for attrs in images:
        src = str(attrs["src"])
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    external = [a for _, attrs in tags for k, a in attrs.items() if k in ("src", "href") and not str(a).startswith("data:")]
    assert external == []
    assert not re.search(r"https?://", page)
    epochs = len(read_metrics_csv(tiny_run / "metrics.csv"))
    metric_rows = re.search(r"Metrics per epoch</h2><table>(.*?)</table>", page, re.S)
    assert metric_rows is not None and metric_rows.group(1).count("<tr>") == epochs + 1  # header + one per epoch
    assert "cnn_bn" in page and "no report.json yet" in page


def test_report_renders_the_evaluation_json(tiny_run: Path) -> None:
    evaluation = {
        "accuracy": 0.8765,
        "split": "test",
        "per_class": [{"class": "sneaker", "precision": 0.91, "recall": 0.5, "f1": 0.6452, "support": 17}],
        "confusion_pairs": [{"true": "shirt", "predicted": "t-shirt", "count": 123}],
        "classes": ["shirt", "고양이"],
        "confusion": [[5, 1], [2, 7]],
    }
    (tiny_run / "report.json").write_text(json.dumps(evaluation))
    page = write_report(tiny_run).read_text(encoding="utf-8")
    section = page.split("<h2>Evaluation</h2>", 1)[1].split("<h2>", 1)[0]
    for text in (
        "87.65%",
        "sneaker",
        "64.52%",
        "91.00%",
        "<td>17</td>",
        "shirt",
        "t-shirt",
        "<td>123</td>",
        "per class",
        "confusion pairs",
    ):
        assert text in section
    assert "<td>shirt, 고양이</td>" in section and "[[" not in section and '["' not in section  # text, not JSON
    confusion = re.search(r"<table class='confusion'>(.*?)</table>", section, re.S)
    assert confusion is not None
    cells = [
        [int(v) for v in re.findall(r"<td>(\d+)</td>", row)]
        for row in re.findall(r"<tr><th>[^<]*</th>(.*?)</tr>", confusion.group(1).split("<tbody>")[1])
    ]
    assert cells == [[5, 1], [2, 7]] and "<th>고양이</th>" in confusion.group(1)


def test_report_without_convolutions_notes_the_figures_that_do_not_apply(cli, tiny_idx: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("train", *TINY, "--data-dir", str(tiny_idx), "--model", "mlp", "--out", "mlp").code == 0
    page = write_report(tmp_path / "mlp", out=tmp_path / "elsewhere" / "r.html").read_text(encoding="utf-8")
    shown = {str(attrs["alt"]) for tag, attrs in parse(page) if tag == "img"}
    assert shown == {"curves", "samples", "predictions", "confusion", "mistakes"}
    assert page.count("not shown (") == 3


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium found on PATH (Debian: apt-get install chromium; .ci/run installs it)")


def chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on a local file, offline, with console messages logged to stderr."""
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
    ]  # fmt: skip
    return subprocess.run([find_chromium(), *flags, *extra, page.as_uri()], capture_output=True, text=True, timeout=120)


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def body_state(dom: str) -> dict[str, str]:
    body = next(attrs for tag, attrs in parse(dom) if tag == "body")
    return {k: str(v) for k, v in body.items()}


def test_report_renders_in_headless_chromium(tiny_run: Path, tmp_path: Path) -> None:
    find_chromium()
    report = write_report(tiny_run)
    dumped = chromium(report, tmp_path / "profile-dom", "--dump-dom")
    state = body_state(dumped.stdout)
    assert state["data-rendered"] == "yes", state
    assert state["data-images"] == state["data-images-loaded"] == str(len(FIGURE_KINDS))
    assert console_errors(dumped.stderr) == []
    shot = tmp_path / "report.png"
    shown = chromium(report, tmp_path / "profile-shot", "--hide-scrollbars", "--window-size=1200,2400", f"--screenshot={shot}")
    assert shot.is_file(), shown.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 20  # text, tables and figures, not a blank page
    assert (pixels < 128).mean() > 0.05  # a real share of dark pixels (the figures' black backgrounds and text)
    assert console_errors(shown.stderr) == []


def test_the_chromium_check_catches_a_broken_page(tmp_path: Path) -> None:
    find_chromium()
    from deepfit.report import CHECK_SCRIPT

    page = tmp_path / "broken.html"
    page.write_text(
        f"<html><head><script>{CHECK_SCRIPT}</script></head><body>"
        "<img src='data:image/png;base64,AAAA'><script>undefinedFunction();</script></body></html>"
    )
    dumped = chromium(page, tmp_path / "profile", "--dump-dom")
    state = body_state(dumped.stdout)
    assert state["data-rendered"] == "no" and state["data-images-loaded"] == "0" and state["data-errors"] == "1"
    assert any("Uncaught" in line for line in console_errors(dumped.stderr))


def test_report_never_writes_over_a_checkpoint_nor_into_a_name_not_html(cli, tiny_run: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`report RUN --out RUN/checkpoints/best.pt` wrote the page over the weights it reports on."""
    best = tiny_run / "checkpoints" / "best.pt"
    weights = best.read_bytes()
    for out, said in ((best, "a report is written as *.html, *.htm; name it so"), (tmp_path / "notes.txt", "a report is written as")):
        result = cli("report", str(tiny_run), "--out", str(out))
        assert result.code == 2 and result.err.startswith(f"deepfit: error: --out {out}: {said}"), result.err
    assert best.read_bytes() == weights and not (tmp_path / "notes.txt").exists()
    disguised = tmp_path / "page.html"
    shutil.copy(best, disguised)  # a checkpoint under any name is still refused
    result = cli("report", str(tiny_run), "--out", str(disguised))
    assert result.code == 2 and "is a PyTorch checkpoint; a report does not replace weights" in result.err, result.err
    assert disguised.read_bytes() == weights
