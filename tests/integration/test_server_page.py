"""The chat page in a real browser: headless Chromium driven by Selenium with Debian's chromium-driver.

Two widths: 1280 px (a desktop) and 400 px (a phone, by device emulation: headless Chrome's smallest window is
about 500 px). Every control is used: example prompts, send, stop, copy, regenerate, the plugin switches, new
chat, rename, delete, the drawer, and retry after a network failure. Screenshots go to ``$MOSS_AGENT_ARTIFACTS``
(else ``tests/artifacts/``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moss_agent.memory.store import SQLiteStore
from moss_agent.server import ServerSettings, create_app
from moss_agent.server.testing import running_server
from moss_agent.testing.scripted_rules import RuleBasedEngine

pytestmark = [pytest.mark.allow_hosts(["127.0.0.1"]), pytest.mark.timeout(240)]

KEY = "page-key"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",  # containers have a small /dev/shm
    "--window-size=1280,900",
)
ARTIFACTS = Path(os.environ.get("MOSS_AGENT_ARTIFACTS") or Path(__file__).parents[1] / "artifacts")
DOCS = [
    ("MOSS, Fudan's model", "https://example.org/moss", "MOSS is a plugin-augmented chat model from Fudan University."),
    ("Plugins", "https://example.org/plugins", "MOSS calls plugins: search, calculator, solver, text-to-image."),
]
# What the page must render from the model's Markdown: emphasis, code, a list, a link, and a citation.
MARKDOWN_REPLY = (
    " **MOSS** is a chat model<sup><|1|></sup> with `plugins`.\n\n"
    "```python\nprint('<b>not bold</b>')\n```\n"
    "- one\n- two\n\n"
    "See [the paper](https://example.org/paper) or <img src=x onerror=alert(1)>.<eom>"
)


class PageEngine(RuleBasedEngine):
    """The rule-based engine, plus a Markdown reply with a citation after a search and a slow reply to stop."""

    def answer(self, prompt: str) -> str:
        """Markdown after Search results; otherwise the rules."""
        text = super().answer(prompt)
        if text.startswith(" The result is:") and "Search(" in prompt[prompt.rfind("<|Human|>") :]:
            return MARKDOWN_REPLY
        if "slowly" in prompt[prompt.rfind("<|Human|>") :] and not prompt.endswith("<|Inner Thoughts|>:"):
            return " " + "word " * 200 + "<eom>"
        return text

    @staticmethod
    def pace(text: str) -> float:
        """Seconds per token: slower for the two replies the test watches while they stream.

        The drawing's reply (8 tokens) must be seen growing, in at least three renders, even when a busy machine
        gives the page few frames; the slow reply (200 tokens, 20 s) must still be running when the test, at the
        pace of its browser commands, clicks stop.
        """
        if "Image generated" in text:
            return 0.15
        if "word word" in text:
            return 0.1
        return 0.02

    def stream(self, prompt: str, params: Any) -> Iterator[Any]:
        """Token by token at a pace a page renders in several frames (the rules alone write in a few ms)."""
        pace = self.pace(self.answer(prompt))
        for delta in super().stream(prompt, params):
            time.sleep(pace)
            yield delta


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("Chromium and chromedriver are not installed: apt-get install -y chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    # Explicit paths: Selenium Manager (which would download drivers) never runs.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, SQLiteStore]]:
    pytest.importorskip("diffusers")
    import torch

    from moss_agent.testing.images import tiny_text2image_pipeline
    from moss_agent.tools import make_tools
    from moss_agent.tools.search import SearchTool
    from moss_agent.tools.search_backends import SearchHit
    from moss_agent.tools.text_to_image import TextToImageTool

    tmp_path = tmp_path_factory.mktemp("page")
    torch.set_num_threads(1)  # 2 shared cores: torch's own threads only oversubscribe them
    painter = TextToImageTool(
        model=str(tiny_text2image_pipeline()), output_dir=tmp_path / "images", steps=2, height=64, width=64
    )
    search = SearchTool.from_documents([SearchHit(title, url, text) for title, url, text in DOCS])
    store = SQLiteStore(tmp_path / "chats.sqlite3")
    tools = [search, *make_tools(["calculator"]), painter]
    app = create_app(PageEngine(), tools=tools, store=store, settings=ServerSettings(api_key=KEY))
    with running_server(app) as url:
        yield url, store


def save_screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def set_width(driver: Any, width: int, *, dark: bool = False) -> None:
    """Emulate a screen ``width`` px wide (a phone below 500 px) and the system's colour scheme."""
    metrics = {"width": width, "height": 860, "deviceScaleFactor": 1, "mobile": width < 500}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    scheme = [{"name": "prefers-color-scheme", "value": "dark" if dark else "light"}]
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": scheme})


def open_page(driver: Any, url: str, *, type_key: bool = False) -> Any:
    """Open the page with the API key: typed into its field as a user does, or already kept by the browser."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    driver.get(url + "/")
    driver.execute_script(
        "localStorage.clear()" if type_key else "localStorage.setItem('moss-api-key', arguments[0])", KEY
    )
    driver.get(url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    if type_key:
        assert "needs an API key" in driver.find_element(By.ID, "banner-text").text
        driver.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)
        wait.until(
            lambda d: (
                d.find_elements(By.CSS_SELECTOR, "#plugins input")
                and not d.find_element(By.ID, "banner").is_displayed()
            )
        )
    return wait


def finished(driver: Any) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#send:not([hidden])") and not driver.find_elements(
        By.CSS_SELECTOR, ".msg.assistant:not(.done):not(.failed):not(.stopped)"
    )


def click(driver: Any, selector: str) -> None:
    """Click the element as the user would; the list re-renders as answers arrive, so retry a stale one."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def attempt(d: Any) -> bool:
        d.find_element(By.CSS_SELECTOR, selector).click()
        return True

    WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,)).until(attempt)


def trace_text(driver: Any) -> str:
    return str(driver.execute_script("return document.querySelector('.msg.assistant details.trace').textContent"))


def test_desktop_page_renders_streams_and_every_control_works(
    browser: Any, server: tuple[str, SQLiteStore], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, store = server
    earlier = {s.session_id for s in store.list_sessions()}  # the module's other tests share the server
    set_width(browser, 1280)
    wait = open_page(browser, url, type_key=True)
    assert browser.find_element(By.ID, "api-key").is_displayed()  # the server has a key: the page asks for it
    icon = browser.find_element(By.CSS_SELECTOR, "link[rel=icon]").get_attribute("href")
    assert browser.execute_script("return fetch(arguments[0]).then(r => r.status)", icon) == 200

    # The empty state offers one example per enabled plugin; clicking one asks it.
    examples = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#examples button")]
    assert len(examples) == 3 and any("37 * 12" in e for e in examples) and any("Draw" in e for e in examples)
    boxes = browser.find_elements(By.CSS_SELECTOR, "#plugins input[type=checkbox]")
    assert [(b.get_attribute("value"), b.is_selected()) for b in boxes] == [
        ("search", True),
        ("calculator", True),
        ("text2image", True),
    ]
    browser.execute_script(
        "window.replyLengths = [];"
        "new MutationObserver(() => { const r = document.querySelector('.msg.assistant .reply');"
        " if (r) window.replyLengths.push(r.textContent.length); })"
        ".observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});"
    )
    click(browser, "#examples button:last-child")  # the drawing
    wait.until(finished)
    assert not browser.find_element(By.ID, "banner").is_displayed()
    answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .reply")
    assert answer.text == "The result is: Image generated successfully."
    lengths = browser.execute_script("return window.replyLengths")
    assert len({n for n in lengths if 0 < n < len(answer.text)}) >= 3, lengths  # seen while it streamed
    image = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant img.generated"))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 64)
    trace = browser.find_element(By.CSS_SELECTOR, ".msg.assistant details.trace")
    assert trace.get_attribute("open") is None  # folded under the reply
    live_trace = trace_text(browser)
    assert 'Text2Image("a red cat on a sofa")' in live_trace and "The user asks for" in live_trace
    (conversation_id,) = [s.session_id for s in store.list_sessions() if s.session_id not in earlier]

    # A search turn: the reply's Markdown becomes elements, never HTML from the model; the citation links its source.
    box = browser.find_element(By.ID, "input")
    box.send_keys("Search for MOSS plugins", Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 2)
    reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .reply")[1]
    assert reply.find_element(By.TAG_NAME, "strong").text == "MOSS"
    assert reply.find_element(By.CSS_SELECTOR, "p code").text == "plugins"
    assert reply.find_element(By.CSS_SELECTOR, "pre code").text == "print('<b>not bold</b>')"
    assert [li.text for li in reply.find_elements(By.CSS_SELECTOR, "ul li")] == ["one", "two"]
    assert reply.find_element(By.LINK_TEXT, "the paper").get_attribute("href") == "https://example.org/paper"
    cite = reply.find_element(By.CSS_SELECTOR, "sup.cite a")
    assert cite.text == "[1]" and cite.get_attribute("href") in {u for _, u, _ in DOCS}
    assert not reply.find_elements(By.CSS_SELECTOR, "b, img, script")  # model text never became HTML
    assert "<img src=x onerror=alert(1)>" in reply.text
    sources = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .sources")[1]
    assert sources.find_elements(By.TAG_NAME, "a")
    assert store.load(conversation_id) is not None and len(store.load(conversation_id).turns) == 2

    # Copy puts the reply's Markdown on the clipboard.
    browser.execute_cdp_cmd(
        "Browser.grantPermissions",
        {"origin": url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    # "Copied" shows for 1.5 s only: an observer set up before the click sees it, however slow the polling.
    browser.execute_script(
        "const button = document.querySelectorAll('.actions button.copy')[1]; window.copied = false;"
        "new MutationObserver(() => { if (button.textContent === 'Copied') window.copied = true; })"
        ".observe(button, {childList: true, characterData: true, subtree: true});"
    )
    browser.find_elements(By.CSS_SELECTOR, ".actions button.copy")[1].click()
    wait.until(lambda d: d.execute_script("return window.copied"))
    clip = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0])")
    assert clip == MARKDOWN_REPLY[1:].removesuffix("<eom>")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".actions button.regenerate")) == 1  # only the last turn

    # Regenerate: the last turn is asked again and replaces the old one, in the page and in the store.
    from selenium.webdriver.support.expected_conditions import staleness_of

    old = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1]
    click(browser, ".actions button.regenerate")
    wait.until(staleness_of(old))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 2 and finished(d))
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
    assert [t.human for t in store.load(conversation_id).turns] == [
        'Draw a picture of "a red cat on a sofa"',
        "Search for MOSS plugins",
    ]
    trace_after = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant details.trace")[1]
    trace_after.find_element(By.TAG_NAME, "summary").click()
    save_screenshot(browser, "moss_chat_page_1280.png")

    # Stop: a slow reply ends when asked; the page is ready for the next message.
    box.send_keys("Answer slowly please", Keys.ENTER)
    wait.until(
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 3
            and d.find_elements(By.CSS_SELECTOR, ".msg.assistant:last-child .reply p")
        )
    )
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.stopped"))
    assert browser.find_element(By.ID, "status").text == "Stopped."
    assert browser.find_element(By.ID, "send").is_displayed()
    stopped = browser.find_element(By.CSS_SELECTOR, ".msg.assistant.stopped .reply").text
    assert 0 < len(stopped) < len("word " * 200)

    # Switch search off for this conversation: the server keeps it.
    browser.find_element(By.CSS_SELECTOR, "#plugins input[value=search]").click()
    wait.until(lambda d: "- Web search: disabled." in (store.load(conversation_id).system or ""))
    assert len(store.load(conversation_id).turns) == 2  # the stopped turn was not kept

    # A new chat, then the stored one again: the same trace as live, the image and the switches come back.
    browser.find_element(By.ID, "new-chat").click()
    wait.until(
        lambda d: (
            not d.find_elements(By.CSS_SELECTOR, "#messages .msg") and d.find_element(By.ID, "empty").is_displayed()
        )
    )
    click(browser, f"#conversations li[data-id='{conversation_id}'] .title")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) >= 2)
    assert trace_text(browser) == live_trace
    restored = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant img.generated"))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", restored) == 64)
    cite = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .reply")[1].find_element(
        By.CSS_SELECTOR, "sup.cite a"
    )
    assert cite.get_attribute("href") in {u for _, u, _ in DOCS}
    checked = [b.is_selected() for b in browser.find_elements(By.CSS_SELECTOR, "#plugins input[type=checkbox]")]
    assert checked == [False, True, True]
    assert browser.current_url.endswith("#" + conversation_id)  # a reload comes back to it

    # Rename, then delete.
    click(browser, f"#conversations li[data-id='{conversation_id}'] button.rename")
    field = browser.find_element(By.CSS_SELECTOR, "#conversations li input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("Cats and MOSS", Keys.ENTER)
    wait.until(
        lambda d: (
            d.find_element(By.CSS_SELECTOR, f"#conversations li[data-id='{conversation_id}'] .title").text
            == "Cats and MOSS"
        )
    )
    browser.refresh()
    wait.until(
        lambda d: (
            d.find_element(By.CSS_SELECTOR, f"#conversations li[data-id='{conversation_id}'] .title").text
            == "Cats and MOSS"
        )
    )
    click(browser, f"#conversations li[data-id='{conversation_id}'] button.delete")
    wait.until(lambda d: d.switch_to.alert).accept()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, f"#conversations li[data-id='{conversation_id}']"))
    assert store.load(conversation_id) is None
    assert browser.find_element(By.ID, "empty").is_displayed()


def test_network_failure_is_shown_once_and_retried(browser: Any, server: tuple[str, SQLiteStore]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, store = server
    set_width(browser, 1280)
    wait = open_page(browser, url)
    offline = {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", offline)
    try:
        browser.find_element(By.ID, "input").send_keys('Calculate "6*7"', Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "banner").is_displayed())
        assert "can't be reached" in browser.find_element(By.ID, "banner-text").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#banner, .msg.error")) == 1  # said once
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.assistant:not(.failed)")  # no stuck "…"
    finally:
        online = {**offline, "offline": False}
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", online)
    browser.find_element(By.ID, "retry").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done") and finished(d))
    assert not browser.find_element(By.ID, "banner").is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 1
    assert browser.find_element(By.CSS_SELECTOR, ".msg.assistant .reply").text == "The result is: 42"
    asked = [t.human for info in store.list_sessions() for t in store.load(info.session_id).turns]
    assert asked.count('Calculate "6*7"') == 1  # sent once by the retry, not twice


NARROW_CHECK = """
// Text nodes wrapped to about one character per line: the 400 px page must have none.
const bad = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
  const text = node.textContent.trim();
  if (text.length < 6 || !node.parentElement.checkVisibility()) continue;
  const range = document.createRange();
  range.selectNodeContents(node);
  const tops = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
  if (tops.size >= 3 && text.length / tops.size < 4) bad.push(text.slice(0, 40));
}
const inputs = [...document.querySelectorAll('[placeholder]')].filter(e => e.checkVisibility())
  .filter(e => e.getBoundingClientRect().width < 200).map(e => e.id);
return [bad, inputs];
"""


def test_phone_width_has_a_drawer_and_a_full_width_composer(browser: Any, server: tuple[str, SQLiteStore]) -> None:
    from selenium.webdriver.common.by import By

    url, _ = server
    set_width(browser, 400)
    try:
        wait = open_page(browser, url)
        width = browser.execute_script("return window.innerWidth")
        assert width == 400
        composer = browser.find_element(By.ID, "input").rect["width"]
        assert composer >= 0.8 * width, composer
        sidebar = browser.find_element(By.ID, "sidebar")
        assert sidebar.rect["x"] + sidebar.rect["width"] <= 0  # off screen: a drawer
        assert browser.execute_script(NARROW_CHECK) == [[], []]
        save_screenshot(browser, "moss_chat_page_400_empty.png")

        browser.find_element(By.ID, "input").send_keys("What is 12 * 7 with the calculator?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done") and finished(d))
        browser.find_element(By.CSS_SELECTOR, ".msg.assistant details.trace summary").click()
        assert browser.execute_script(NARROW_CHECK) == [[], []]
        message = browser.find_element(By.CSS_SELECTOR, ".msg.assistant").rect
        assert message["x"] >= 0 and message["x"] + message["width"] <= width
        save_screenshot(browser, "moss_chat_page_400.png")

        browser.find_element(By.ID, "menu").click()  # the drawer opens over the page
        wait.until(lambda d: d.find_element(By.ID, "sidebar").rect["x"] >= 0)
        time.sleep(0.3)  # the slide's end, for the picture
        save_screenshot(browser, "moss_chat_page_400_drawer.png")
        click(browser, "#new-chat")  # and closes when a choice is made
        wait.until(
            lambda d: d.find_element(By.ID, "sidebar").rect["x"] + d.find_element(By.ID, "sidebar").rect["width"] <= 0
        )
        browser.find_element(By.ID, "menu").click()
        wait.until(lambda d: d.find_element(By.ID, "sidebar").rect["x"] >= 0)
        from selenium.webdriver.common.action_chains import ActionChains

        scrim = browser.find_element(By.ID, "scrim")  # a tap beside the drawer closes it
        ActionChains(browser).move_to_element_with_offset(scrim, 180, 0).click().perform()
        wait.until(
            lambda d: d.find_element(By.ID, "sidebar").rect["x"] + d.find_element(By.ID, "sidebar").rect["width"] <= 0
        )
        browser.find_element(By.ID, "menu").click()
        wait.until(lambda d: d.find_element(By.ID, "sidebar").rect["x"] >= 0)
        click(browser, "#close-drawer")
        wait.until(
            lambda d: d.find_element(By.ID, "sidebar").rect["x"] + d.find_element(By.ID, "sidebar").rect["width"] <= 0
        )

        # Dark mode follows the system setting.
        set_width(browser, 400, dark=True)
        background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        channels = [int(c) for c in background[background.index("(") + 1 : -1].split(",")[:3]]
        assert sum(channels) < 3 * 80, background
        save_screenshot(browser, "moss_chat_page_400_dark.png")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


NEW_TAB = 'target="_blank" rel="noopener noreferrer nofollow"'
MARKDOWN_CASES = [
    ("# Title\n\nSome *text*.", "<h1>Title</h1><p>Some <em>text</em>.</p>"),
    (
        "| a | b |\n|---|:-:|\n| 1 | 2 |",
        "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td>2</td></tr></tbody></table>",
    ),
    ("- a\n  - b\n- c", "<ul><li>a<ul><li>b</li></ul></li><li>c</li></ul>"),
    ("1. one\n2. two", "<ol><li>one</li><li>two</li></ol>"),
    ("> said\n> twice", "<blockquote><p>said<br>twice</p></blockquote>"),
    ("```py\nx = 1", '<pre><code data-lang="py">x = 1</code></pre>'),  # still streaming: no closing fence yet
    ("12*7 and 3*4, 2**10 and 3**2, snake_case_name", "<p>12*7 and 3*4, 2**10 and 3**2, snake_case_name</p>"),
    (  # no script link, and a remote image is a link to it, never loaded
        "[x](javascript:alert(1)) ![p](https://evil.example/p.png)",
        f'<p>x <a href="https://evil.example/p.png" {NEW_TAB}>p</a></p>',
    ),
    ("<script>alert(1)</script> &amp;", "<p>&lt;script&gt;alert(1)&lt;/script&gt; &amp;amp;</p>"),
    (
        "see https://example.org/a_b.",
        f'<p>see <a href="https://example.org/a_b" {NEW_TAB}>https://example.org/a_b</a>.</p>',
    ),
    (
        "cited<sup><|2|></sup> and <|9|>",
        f'<p>cited<sup class="cite"><a href="https://b.example/" {NEW_TAB} title="B">[2]</a></sup>'
        ' and <sup class="cite">[9]</sup></p>',
    ),
]


def test_markdown_becomes_elements_never_html(browser: Any, server: tuple[str, SQLiteStore]) -> None:
    url, _ = server
    set_width(browser, 1280)
    open_page(browser, url)
    script = (
        "const box = document.createElement('div');"
        "const sources = [{title: 'A', url: 'https://a.example/'}, {title: 'B', url: 'https://b.example/'}];"
        "box.append(MossMarkdown.render(arguments[0], {sources}));"
        "return box.innerHTML;"
    )
    for text, html in MARKDOWN_CASES:
        assert browser.execute_script(script, text) == html, text
