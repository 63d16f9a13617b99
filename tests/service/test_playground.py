"""The playground (GET /) in a real headless browser: Debian's chromium driven by selenium through chromedriver,
against the real service (tiny CosyVoice2 model) with an API key. The page connects once the key is typed in,
plays text while it streams (the page decodes the PCM it receives into Web Audio buffers and shows the first-audio
latency and the real-time factor), resampled when a sample rate is chosen, and registers a speaker from an
uploaded recording. The last screenshot of the page is kept in tests/artifacts/playground.png."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest

from service_live import DEFAULT_PROMPT, REPO_ROOT, running_service, service_env

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="Debian's chromium and chromium-driver are not installed "
                                       "(scripts/setup.sh installs them)")

API_KEY = "playground-key"
SCREENSHOT = REPO_ROOT / "tests" / "artifacts" / "playground.png"


@pytest.fixture(scope="module")
def service(tiny_cosyvoice2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("playground")
    env = {**service_env(workdir, "cosyvoice2", tiny_cosyvoice2_dir), "COSYAPP_SERVER_API_KEY": API_KEY}
    with running_service(workdir, env) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    # A container has no sandbox and a small /dev/shm; Web Audio may start without a click on the page.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--autoplay-policy=no-user-gesture-required", "--window-size=1000,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))
        print(f"playground screenshot: {SCREENSHOT}")
        driver.quit()


def text_of(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def wait_for(driver, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def state(driver) -> str:
    return driver.execute_script("return document.body.dataset.state")


def play(driver) -> None:
    """Press play and wait until the whole answer has been received and decoded (or the page shows an error)."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "play").click()
    wait_for(driver, lambda d: state(d) in ("done", "error"))
    assert state(driver) == "done", text_of(driver, "status")


def test_the_page_needs_no_key_but_its_api_calls_do(service) -> None:
    page = httpx.get(f"{service.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(f"{service.url}/playground/playground.js", timeout=10).status_code == 200
    assert httpx.get(f"{service.url}/model_info", timeout=10).status_code == 401
    # Everything the page loads comes from the service itself (no CDN).
    assert not re.search(r"""(src|href)=["']https?://""", page.text)


def test_play_streams_decodes_and_shows_latency(service, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{service.url}/")
    wait_for(browser, lambda d: "401" in text_of(d, "status"), 30)  # no key yet: the page says what is missing
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "connect").click()
    wait_for(browser, lambda d: text_of(d, "status") == "ready", 30)
    assert [option.text for option in Select(browser.find_element(By.ID, "backend")).options] == ["cosyvoice2"]
    assert "CosyVoice2" in text_of(browser, "model")

    text = browser.find_element(By.ID, "text")
    text.clear()
    text.send_keys("你好，欢迎光临。今天的特价菜是红烧肉。")
    play(browser)
    samples = int(text_of(browser, "samples"))
    assert samples > 0 and int(text_of(browser, "bytes")) == 2 * samples
    assert text_of(browser, "rate") == "24000"
    assert re.fullmatch(r"\d+ ms", text_of(browser, "latency")), text_of(browser, "latency")
    assert float(text_of(browser, "rtf")) > 0

    Select(browser.find_element(By.ID, "sample-rate")).select_by_visible_text("16000")
    play(browser)
    assert text_of(browser, "rate") == "16000" and int(text_of(browser, "samples")) > 0


def test_register_a_speaker_from_an_uploaded_recording_and_speak_with_it(service, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{service.url}/")  # the page remembers the key and connects with it
    wait_for(browser, lambda d: text_of(d, "status") == "ready", 30)
    browser.find_element(By.ID, "voice-file").send_keys(str(DEFAULT_PROMPT))
    browser.find_element(By.ID, "prompt-text").send_keys("欢迎光临，请问您需要点什么？")
    browser.find_element(By.ID, "speaker-id").send_keys("page_voice")
    browser.find_element(By.ID, "register").click()
    wait_for(browser, lambda d: "registered" in text_of(d, "status") or state(d) == "error", 120)
    assert "speaker page_voice registered" in text_of(browser, "status")
    assert "page_voice" in httpx.get(f"{service.url}/model_info", headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=10).json()["speakers"]
    assert Select(browser.find_element(By.ID, "voice")).first_selected_option.get_attribute("value") == "page_voice"
    Select(browser.find_element(By.ID, "mode")).select_by_value("zero_shot")
    play(browser)
    assert int(text_of(browser, "samples")) > 0
    assert re.fullmatch(r"\d+ ms", text_of(browser, "latency"))
