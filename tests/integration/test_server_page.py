"""The chat page in a real browser: headless Chromium driven by Selenium with Debian's chromium-driver."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moss_agent.memory.store import SQLiteStore
from moss_agent.server import ServerSettings, create_app
from moss_agent.server.testing import running_server
from moss_agent.testing.scripted_rules import RuleBasedEngine

pytestmark = [pytest.mark.allow_hosts(["127.0.0.1"]), pytest.mark.timeout(180)]

KEY = "page-key"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",  # containers have a small /dev/shm
    "--window-size=1200,900",
)
QUESTION = 'Draw a picture of "a red cat"'


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("Chromium and chromedriver are not installed: apt-get install -y chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    # Explicit paths: Selenium Manager (which would download drivers) never runs.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, SQLiteStore]]:
    pytest.importorskip("diffusers")
    import torch

    from moss_agent.testing.images import tiny_text2image_pipeline
    from moss_agent.tools import make_tools
    from moss_agent.tools.text_to_image import TextToImageTool

    torch.set_num_threads(1)  # 2 shared cores: torch's own threads only oversubscribe them
    painter = TextToImageTool(
        model=str(tiny_text2image_pipeline()), output_dir=tmp_path / "images", steps=2, height=64, width=64
    )
    store = SQLiteStore(tmp_path / "chats.sqlite3")
    tools = [*make_tools(["calculator"]), painter]
    app = create_app(RuleBasedEngine(), tools=tools, store=store, settings=ServerSettings(api_key=KEY))
    with running_server(app) as url:
        yield url, store


def save_screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    artifacts = os.environ.get("MOSS_AGENT_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / name)
    return path


def test_page_streams_a_reply_with_its_plugin_trace_and_image(
    browser: Any, server: tuple[str, SQLiteStore], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, store = server
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    key = browser.find_element(By.ID, "api-key")
    assert key.is_displayed()  # the server has a key: the page asks for it
    key.send_keys(KEY, Keys.TAB)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#plugins input[type=checkbox]")) == 2)
    boxes = browser.find_elements(By.CSS_SELECTOR, "#plugins input[type=checkbox]")
    assert [(b.get_attribute("value"), b.is_selected()) for b in boxes] == [("calculator", True), ("text2image", True)]

    # Record the reply's text at each update (each update adds a text node that keeps the text of its
    # moment): a streamed reply grows in several steps.
    browser.execute_script(
        "window.replyLengths = [];"
        "new MutationObserver((records) => { for (const r of records) {"
        " if (r.target.classList && r.target.classList.contains('reply'))"
        "  for (const n of r.addedNodes) window.replyLengths.push(n.textContent.length); } })"
        ".observe(document.getElementById('messages'), {childList: true, subtree: true});"
    )
    box = browser.find_element(By.ID, "input")
    box.send_keys(QUESTION, Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done, .msg.error"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .reply")
    assert answer.text == "The result is: Image generated successfully."
    lengths = browser.execute_script("return window.replyLengths")
    assert len({n for n in lengths if 0 < n < len(answer.text)}) >= 3, lengths  # seen while it streamed

    image = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant img.generated"))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 64)
    trace = browser.find_element(By.CSS_SELECTOR, ".msg.assistant details.trace")
    assert trace.get_attribute("open") is None  # collapsed under the reply
    text = trace.get_attribute("textContent")
    assert 'Text2Image("a red cat")' in text and "The user asks for" in text
    trace.find_element(By.TAG_NAME, "summary").click()
    save_screenshot(browser, tmp_path, "moss_chat_page.png")

    items = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#conversations li"))
    assert [i.text for i in items] == [QUESTION]
    (conversation_id,) = [s.session_id for s in store.list_sessions()]
    assert items[0].get_attribute("data-id") == conversation_id

    # Switch the painter off for this conversation: the server keeps it.
    boxes[1].click()
    wait.until(lambda d: "- Text-to-image: disabled." in (store.load(conversation_id).system or ""))

    # A new chat, then the stored one again: its turn comes back from the store, image included.
    browser.find_element(By.ID, "new-chat").click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#messages .msg"))
    # The list is re-rendered as the server's answers arrive: find and click it as one retried step.
    from selenium.common.exceptions import StaleElementReferenceException

    def open_stored(d: Any) -> bool:
        d.find_element(By.CSS_SELECTOR, "#conversations li").click()
        return True

    WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,)).until(open_stored)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .reply"))
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == QUESTION
    restored = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant img.generated"))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", restored) == 64)
    checked = [b.is_selected() for b in browser.find_elements(By.CSS_SELECTOR, "#plugins input[type=checkbox]")]
    assert checked == [True, False]
    assert len(store.load(conversation_id).turns) == 1
