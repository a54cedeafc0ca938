"""The page in a real browser: headless Chromium (Debian's chromium + chromium-driver) against a loopback server."""

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from mlx_dlm.server import make_server

from conftest import needs

webdriver = needs("selenium.webdriver", "test")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="Chromium and chromedriver are not installed (apt-get install chromium "
                                       "chromium-driver; .ci/run installs them)")


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def served(tiny_model_dir):
    server = make_server(str(tiny_model_dir), port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield "http://%s:%d" % server.server_address[:2]
    server.shutdown()
    server.server_close()


def _wait(driver, condition, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = driver.execute_script(condition)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {condition}")


def _run_form(driver, fields: dict) -> None:
    """Type the fields into the page's form and press its button."""
    for field, value in fields.items():
        box = driver.find_element("id", field)
        box.clear()
        box.send_keys(value)
    driver.find_element("id", "go").click()


def test_page_streams_frames_fills_the_canvas_and_matches_the_api(browser, served):
    import http.client

    browser.get(f"{served}/")
    _wait(browser, "return document.body.dataset.model === 'tiny'")  # the model's defaults, shown as placeholders
    assert browser.find_element("id", "steps").get_attribute("placeholder") == "32 (the model's)"
    assert browser.find_element("css selector", "#strategy option").text == "the model's: confidence"
    _run_form(browser, {"prompt": "ROMEO:", "max_tokens": "48", "steps": "12", "seed": "5"})
    _wait(browser, "return document.body.dataset.state === 'done'")
    frames = int(browser.execute_script("return document.body.dataset.frames"))
    cells = browser.find_elements("css selector", "#canvas .cell")
    assert frames == 12  # one frame per denoising step arrived and was drawn
    assert len(cells) == 6 + 48 and not browser.find_elements("css selector", "#canvas .masked")  # filled
    assert "12 forward passes" in browser.find_element("id", "stats").text
    page_text = browser.execute_script("return document.body.dataset.text")

    host, port = served.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "ROMEO:", "max_tokens": 48, "steps": 12, "seed": 5}),
                 {"Content-Type": "application/json"})
    api_text = json.loads(conn.getresponse().read())["choices"][0]["text"]
    assert page_text == api_text  # same seed, same text
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []  # no console errors


def _open_from_the_page(driver, url: str, query: str) -> None:
    """Follow ?...&run=1 from the server's own page, as its auto-run requires (the referrer is the page)."""
    driver.get(f"{url}/")
    driver.execute_script(f"location.href = '/?{query}'")
    _wait(driver, f"return location.search === '?{query}'")


def test_page_shows_a_request_error(browser, served):
    _open_from_the_page(browser, served, "prompt=caf%C3%A9&run=1")
    _wait(browser, "return document.body.dataset.state === 'done'")
    assert "is not in the tokenizer's vocabulary" in browser.find_element("id", "error").text


def test_a_link_from_elsewhere_fills_the_form_but_does_not_run(browser, served):
    browser.get(f"{served}/?prompt=From%20elsewhere&run=1")  # no referrer from this server's page
    time.sleep(1.0)
    assert browser.find_element("id", "prompt").get_attribute("value") == "From elsewhere"
    assert browser.execute_script("return document.body.dataset.state || ''") == ""  # nothing started


def test_a_keyed_server_page_asks_for_defaults_only_with_a_key(browser, tiny_model_dir):
    """Under --api-key the page opens without a refused request in its console, shows the model's defaults once a
    key is typed, and runs with it."""
    server = make_server(str(tiny_model_dir), port=0, quiet=True, api_key="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = "http://%s:%d" % server.server_address[:2]
    try:
        browser.get(f"{url}/")
        _wait(browser, "return document.readyState === 'complete'")
        time.sleep(1.0)  # the page's own requests on opening have run
        assert browser.execute_script("return document.body.dataset.model || ''") == ""  # no defaults asked yet
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []  # no 401 logged
        key = browser.find_element("id", "api_key")
        key.send_keys("s3cret")
        browser.find_element("id", "prompt").click()  # leaving the field fires its change event
        _wait(browser, "return document.body.dataset.model === 'tiny'")
        assert browser.find_element("id", "steps").get_attribute("placeholder") == "32 (the model's)"
        _run_form(browser, {"prompt": "ROMEO:", "max_tokens": "16", "steps": "4", "seed": "1"})
        _wait(browser, "return document.body.dataset.state === 'done'")
        assert not browser.find_element("id", "error").text
        assert len(browser.find_elements("css selector", "#canvas .cell")) == 6 + 16
    finally:
        server.shutdown()
        server.server_close()


def screenshot_mid_denoising(url: str, path: Path, driver) -> None:
    """Save the page part-way through a long denoising (for docs/server.md)."""
    _open_from_the_page(driver, url, "prompt=ROMEO:&max_tokens=256&steps=64&seed=1&run=1")
    _wait(driver, "return Number(document.body.dataset.frames || 0) >= 24")
    driver.save_screenshot(str(path))
