"""The review app end to end in a real headless Chromium (Debian's chromium and chromedriver, driven by Selenium)."""

import os
import shutil
import socket
import threading
import time

import pandas as pd
import pytest

from whalefast.runs.folder import Run

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _browser():
    if not (CHROMIUM and CHROMEDRIVER):
        message = "needs Debian's chromium and chromium-driver (scripts/install-test-deps.sh installs them)"
        if os.environ.get("WHALEFAST_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000", "--disable-gpu"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.implicitly_wait(20)  # find_element waits for the next page's elements
    return browser


def _page_once_it_shows(browser, text: str, timeout: float = 20) -> str:
    """The page source once it contains `text`, or when `timeout` runs out: click() returns before a form's next page loads."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(browser, timeout).until(lambda b: text in b.page_source)
    except TimeoutException:
        pass
    return browser.page_source


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny_arcface, tmp_path, copy_run):
    """The review app of a copy of the tiny arcface run, served by uvicorn on 127.0.0.1."""
    import uvicorn

    from whalefast.review.app import create_app

    run_dir = copy_run(tiny_arcface[0], tmp_path / "models" / "arcface")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(run_dir), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", run_dir
    server.should_exit = True
    thread.join(timeout=10)


def test_upload_confirm_and_check_log_and_catalogue(server, tiny_data, tmp_path, review_log):
    from selenium.webdriver.common.by import By

    url, run_dir = server
    photo = tiny_data / "test" / pd.read_csv(tiny_data / "test_answers.csv").Image[0]
    before = Run.open(run_dir).catalogue().embeddings.shape[0]
    browser = _browser()
    try:
        browser.get(url + "/")
        assert "No query photos yet" in browser.page_source
        browser.find_element(By.ID, "files").send_keys(str(photo))
        browser.find_element(By.CSS_SELECTOR, "#upload button[type=submit]").click()
        assert "added 1 photo to the queue" in _page_once_it_shows(browser, "added 1 photo to the queue")
        browser.find_element(By.ID, "start").click()
        cards = browser.find_elements(By.CSS_SELECTOR, "#candidates .cand")
        assert len(cards) == 5
        top = cards[0].get_attribute("data-id")
        image_loaded = browser.execute_script("return document.getElementById('query-photo').naturalWidth")
        assert image_loaded > 0
        # The page's script is a file of its own (the Content-Security-Policy allows no inline script): it ran.
        assert "/photo/known/" in browser.execute_script("return document.getElementById('known').src")
        browser.find_element(By.ID, "zoom").send_keys("\ue014")  # arrow right: zoom in
        browser.save_screenshot(str(tmp_path / "review.png"))
        cards[0].find_element(By.CSS_SELECTOR, "button.same").click()
        assert f"{photo.name}: same whale {top}" in _page_once_it_shows(browser, f"{photo.name}: same whale {top}")
        assert "Every photo has a decision" in browser.page_source
    finally:
        browser.quit()
    assert (tmp_path / "review.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = review_log(run_dir)
    assert log[["photo", "decision", "id", "rank"]].values.tolist() == [[photo.name, "same", top, "1"]]
    after = Run.open(run_dir).catalogue()
    assert after.embeddings.shape[0] == before + 1 and after.ids[int(after.labels[-1])] == top
