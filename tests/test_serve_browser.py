"""The ``r2 serve`` page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``).

One server on a free localhost port runs the app on the checkpoint of ``test_serve_api.py``; the
page uploads a sample video, grounds a sentence, and must show the windows ``r2 predict --json``
prints, in its list and on its timeline; a click on a moment moves the player into it. A text file
named ``.mp4`` gets its one-sentence error on the page. A screenshot goes to ``runs/serve-test.png``.
Without the browser the tests fail and say what to install (``make test`` installs it when it can:
``scripts/install_browser.sh``).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from r2.serve.app import create_app
from r2.serve.cli import LOCAL_NAMES, bind
from tests.helpers.serve import SENTENCES, VIDEO, cli_records, shared_model

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "runs" / "serve-test.png"
SENTENCE = SENTENCES[0]
TOP = 5  # moments the page shows per sentence


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Any]:
    return shared_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(model) -> Iterator[str]:
    """The app under uvicorn on a free 127.0.0.1 port, in a thread; its URL."""
    sock = bind("127.0.0.1", 0)
    app = create_app(model[1], "best.pt", allowed_hosts=LOCAL_NAMES)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    until(lambda: server.started, 30, "the server did not start")
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver "
                    "(make test runs scripts/install_browser.sh, which does it as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--mute-audio",
        "--window-size=1280,1250", "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield chrome
    chrome.quit()


def until(condition: Callable[[], Any], seconds: float, failure: str) -> Any:
    """Poll ``condition()`` until it is truthy (its value), or fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(failure)


def windows(elements: list[Any]) -> list[list[float]]:
    """``[start, end, score]`` of moment elements, by their ``data-rank``."""
    ranked = sorted(elements, key=lambda e: int(e.get_attribute("data-rank")))
    return [[float(e.get_attribute(f"data-{k}")) for k in ("start", "end", "score")] for e in ranked]


def severe_logs(browser: WebDriver) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def open_page(browser: WebDriver, server: str) -> None:
    browser.get(server)
    until(lambda: browser.find_elements(By.CSS_SELECTOR, "#sample option"), 20, "the page did not load")


def test_page_grounds_a_sentence_like_r2_predict_and_plays_a_moment(browser, server, model) -> None:
    open_page(browser, server)
    assert "charades" in browser.find_element(By.ID, "model").text
    browser.find_element(By.ID, "file").send_keys(str(VIDEO))
    until(lambda: browser.find_element(By.ID, "ground").is_enabled(), 60, "the video never became ready")
    progress = browser.find_element(By.ID, "progress")
    assert progress.get_attribute("data-state") == "ready"
    assert progress.get_attribute("value") == progress.get_attribute("max") == "10"
    assert "10 clips" in browser.find_element(By.ID, "status").text

    browser.find_element(By.ID, "sentences").send_keys(SENTENCE)
    browser.find_element(By.ID, "ground").click()
    listed = until(lambda: browser.find_elements(By.CSS_SELECTOR, "button.moment"), 60, "no moments shown")
    expected = cli_records(model[0], VIDEO, SENTENCES)[0]["pred_relevant_windows"][:TOP]  # qid 0 = SENTENCE
    assert windows(listed) == expected
    assert windows(browser.find_elements(By.CSS_SELECTOR, "svg.timeline rect.band")) == expected
    assert browser.find_element(By.CSS_SELECTOR, ".result h3").text == f"“{SENTENCE}”"
    start, end, score = expected[0]
    assert listed[0].text.split("\n") == [f"{start:.1f} s – {end:.1f} s", f"score {score:.3f}"]

    def player(attribute: str) -> Any:
        return browser.execute_script(f"return document.getElementById('player').{attribute}")

    until(lambda: player("readyState") >= 1, 20, "the player did not load the video")
    away = 0.0 if start >= 1 else 9.5  # start outside the first moment, so that the click must move
    browser.execute_script(f"document.getElementById('player').currentTime = {away}")
    until(lambda: abs(player("currentTime") - away) < 0.01, 10, "the player did not seek")
    listed[0].click()
    def inside() -> bool:  # the page pauses at the moment's end, up to a time update (0.25 s) late
        return start - 0.05 <= player("currentTime") <= end + 0.6

    until(inside, 20, f"the player did not move into {start}-{end} s")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert severe_logs(browser) == []  # nothing refused by the page's security policy, no failed load


def test_a_text_file_named_mp4_shows_one_sentence_on_the_page(browser, server, tmp_path) -> None:
    open_page(browser, server)
    fake = tmp_path / "notes.mp4"
    fake.write_text("a text file, not a video\n")
    browser.find_element(By.ID, "file").send_keys(str(fake))
    error = browser.find_element(By.ID, "error")
    until(error.is_displayed, 20, "no error shown")
    assert error.text.startswith("notes.mp4: not a readable video (") and error.text.endswith(").")
    assert str(tmp_path) not in error.text
    assert not browser.find_element(By.ID, "ground").is_enabled()
    assert browser.find_elements(By.CSS_SELECTOR, "button.moment") == []
