"""The web page in a real headless Chromium (Debian's chromium + chromium-driver through Selenium)
against a live server: uploading a PNG shows the label `deepfit predict` gives it, drawing a
stroke on the canvas and submitting shows a prediction, and a screenshot is written to look at."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve.conftest import KEY, Server
from tests.serve.oracle import predict_cli

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1000,1100",
)  # fmt: skip


def find_browser() -> tuple[str, str]:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no chromium / chromedriver on PATH (Debian: apt-get install chromium chromium-driver; .ci/run installs them)")
    return browser, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    binary, driver_path = find_browser()
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_status(driver: Any, expected_start: str) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith(expected_start))
    return str(driver.find_element(By.ID, "top-label").text)


def test_upload_and_drawing_show_predictions(
    browser: Any, torch_server: Server, serve_run: Path, test_pngs: list[Path], tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(torch_server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: "cnn_bn" in d.find_element(By.ID, "model-name").text)
    assert "T-shirt/top" in browser.find_element(By.ID, "model-facts").text
    assert browser.find_element(By.ID, "draw-panel").is_displayed()  # a 1-channel model can be drawn for

    image = test_pngs[3]
    expected = predict_cli(serve_run, [image], topk=5)[0]
    browser.find_element(By.ID, "file").send_keys(str(image))
    assert wait_for_status(browser, image.name + ":") == expected["label"]
    bars = browser.find_elements(By.CSS_SELECTOR, "#results li")
    assert len(bars) == 5 and bars[0].find_element(By.CLASS_NAME, "label").text == expected["label"]
    assert bars[0].find_element(By.CLASS_NAME, "pct").text == f"{100 * expected['probability']:.1f}%"

    canvas = browser.find_element(By.ID, "canvas")
    stroke = ActionChains(browser).move_to_element_with_offset(canvas, -60, -80).click_and_hold()
    stroke.move_by_offset(40, 60).move_by_offset(40, 60).move_by_offset(30, 40).release().perform()
    drawn = browser.execute_script(
        "const c = document.getElementById('canvas').getContext('2d').getImageData(0, 0, 280, 280).data;"
        "let n = 0; for (let i = 0; i < c.length; i += 4) if (c[i] > 128) n++; return n;"
    )
    assert drawn > 500  # the stroke is on the canvas in white
    browser.find_element(By.ID, "predict-drawing").click()
    label = wait_for_status(browser, "the drawing:")
    assert label in httpx.get(f"{torch_server.url}/v1/model").json()["classes"]

    shot = tmp_path / "serve-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("DEEPFIT_KEEP_SCREENSHOT"):  # a file path: keep the screenshot for a person to look at
        shutil.copyfile(shot, os.environ["DEEPFIT_KEEP_SCREENSHOT"])


def test_the_table_page_builds_a_form_from_the_model_and_shows_its_prediction(browser: Any, table_server: Server, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(table_server.url + "/")
    key = browser.find_element(By.ID, "api-key")
    browser.execute_script("arguments[0].closest('details').open = true", key)
    key.send_keys(KEY, Keys.TAB)  # leaving the field: the page describes the model again, with the key
    WebDriverWait(browser, 60).until(lambda d: "linear" in d.find_element(By.ID, "model-name").text)
    assert browser.find_element(By.ID, "model-facts").text.startswith("predicts price from area, rooms, city")
    browser.find_element(By.NAME, "area").send_keys("150")
    browser.find_element(By.NAME, "rooms").send_keys("4")
    Select(browser.find_element(By.NAME, "city")).select_by_visible_text("east")
    browser.find_element(By.ID, "predict-row").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("the row:"))
    auth = {"Authorization": f"Bearer {KEY}"}
    answer = httpx.post(f"{table_server.url}/v1/predict", json={"rows": [{"area": "150", "rooms": "4", "city": "east"}]}, headers=auth)
    assert float(browser.find_element(By.ID, "top-label").text) == pytest.approx(answer.json()["predictions"][0]["value"], rel=1e-5)
    cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#results td")]
    assert cells[:3] == ["150", "4", "east"] and float(cells[3]) == float(browser.find_element(By.ID, "top-label").text)
    assert browser.save_screenshot(str(tmp_path / "table-answer.png"))

    browser.find_element(By.ID, "csv").send_keys("area,rooms,city\n60,1,north\n90,2,oops\n")
    browser.find_element(By.ID, "predict-csv").click()
    WebDriverWait(browser, 60).until(lambda d: "row 1:" in d.find_element(By.ID, "status").text)
    assert "'oops', a value not seen in training" in browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "status").get_attribute("class") == "error"
    assert browser.save_screenshot(str(tmp_path / "table-page.png"))
