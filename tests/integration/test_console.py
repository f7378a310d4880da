"""The routing console (/ui) in a real headless Chromium, against a real gateway with API keys (real vLLM and
Redis behind it): a key typed in, a prompt typed in, the scores charted, a decision per mode, the answer streamed,
the live counters moved. FLOCK_CONSOLE_SCREENSHOT=<path> keeps a screenshot (docs/img/console.png)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.browser import Browser, chromium_path
from tests.conftest import TEST_EXPERTS, start_gateway, stop_gateway

pytestmark = pytest.mark.integration
KEY, ADMIN = "console-key", "console-admin"


@pytest.fixture(scope="module")
def keyed_gateway(work, vllm_url, redis_server, expert_root):
    env = {"FLOCK_BACKEND_URLS": vllm_url, "FLOCK_REDIS_URL": redis_server.url, "FLOCK_EXPERT_ROOTS": str(expert_root),
           "FLOCK_API_KEYS": KEY, "FLOCK_ADMIN_KEYS": ADMIN}
    gw = start_gateway(work, "console", env)
    try:
        with gw.client(headers={"authorization": f"Bearer {ADMIN}"}) as c:
            for name in TEST_EXPERTS:
                r = c.post("/v1/experts", json={"path": str(expert_root / name)})
                assert r.status_code in (201, 409), r.text  # 409: already in the shared registry
        yield gw
    finally:
        stop_gateway(gw)


@pytest.fixture
def browser():
    chromium_path()  # skip, or fail under CI=true, before starting anything
    b = Browser()
    yield b
    b.close()


def rows(browser: Browser, selector: str) -> dict[str, str]:
    return browser.eval(f"Object.fromEntries([...document.querySelectorAll({selector!r})]"
                        ".map(r => [r.cells[0].innerText, r.cells[1].innerText]))")


def ask(browser: Browser, prompt: str) -> None:
    browser.eval("document.getElementById('prompt').value = ''")
    browser.type("#prompt", prompt)
    browser.click("#send")
    browser.wait_for("['done'].includes(document.getElementById('status').textContent) || "
                     "document.getElementById('status').className === 'error'", 180)
    assert browser.text("#status") == "done", browser.text("#status")


def test_console_shows_the_decision_and_streams_the_answer(keyed_gateway, browser: Browser, tmp_path: Path):
    browser.open(keyed_gateway.url + "/ui")
    # No key: the API's 401 is all the console shows.
    browser.wait_for("document.getElementById('status').className === 'error'")
    assert browser.eval("document.querySelectorAll('#experts li').length") == 0
    browser.type("#key", KEY)
    browser.click("#key-form button")
    browser.wait_for("document.querySelectorAll('#experts li').length === 3")
    assert "Arithmetic calculator" in browser.text("#experts")
    modes = browser.eval("[...document.getElementById('mode').options].map(o => o.value)")
    assert {"global", "merge"} <= set(modes) and browser.eval("document.getElementById('mode').value") == "global"

    ask(browser, "How long should I boil an egg?")
    bars = browser.eval("[...document.querySelectorAll('#chart .bar')].map(b => [b.dataset.expert, "
                        "b.classList.contains('chosen'), Number(b.querySelector('.score').innerText)])")
    assert [b[0] for b in bars][0] == "cooking" and bars[0][1] and not any(b[1] for b in bars[1:])
    assert len(bars) == len(TEST_EXPERTS) and bars[0][2] > bars[1][2]
    assert "threshold" in browser.text("#threshold-label")
    decisions = rows(browser, "#decisions tbody tr")
    assert set(decisions) == set(modes) and decisions["global"] == "cooking (1)"
    assert decisions["merge"].startswith("cooking")
    assert "served by cooking" in browser.text("#answer-meta")

    # Out of domain: every mode abstains and the base model's answer streams in.
    ask(browser, "What is the capital of France?")
    assert all(d == "base model (abstained)" for d in rows(browser, "#decisions tbody tr").values())
    assert "Paris" in browser.text("#answer")
    assert not browser.eval("document.querySelectorAll('#chart .bar.chosen').length")
    # The live counters (from /metrics) count the two answers.
    browser.wait_for("document.querySelectorAll('#selections tbody tr').length >= 2")
    counts = rows(browser, "#selections tbody tr")
    assert float(counts["cooking"]) >= 1 and float(counts["base"]) >= 1
    assert browser.text("#hit-rate").endswith("%")

    shot = tmp_path / "console.png"
    browser.screenshot(shot)
    assert shot.stat().st_size > 10_000
    if os.environ.get("FLOCK_CONSOLE_SCREENSHOT"):
        shutil.copy(shot, os.environ["FLOCK_CONSOLE_SCREENSHOT"])
