"""The web page against the session's real cluster (tests/fixtures/cluster.py:
a queen with its HTTP front door, a node over mutual TLS, one warm real
worker of the default model): the node and the worker as they are, and the
playground streaming an answer from the real engine token by token through
/v1/chat/completions, with its time to first token and tokens/s under it."""

from __future__ import annotations

import pytest

from tests.fixtures.browser import Page
from tests.fixtures.cluster import SLOTS, Cluster

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.engine]

# Every change of the answer's text, seen in the page itself as it happens.
WATCH_ANSWER = """
window.__answerLengths = [];
new MutationObserver(() => {
  const answer = document.querySelector('#play-transcript .msg.assistant .text');
  if (answer) window.__answerLengths.push(answer.textContent.length);
}).observe(document.getElementById('play-transcript'), {subtree: true, childList: true, characterData: true});
"""


async def test_the_real_cluster_and_the_playground(cluster: Cluster, browser: Page) -> None:
    browser.open(cluster.root_url + "/")
    browser.fill("#login-key", cluster.admin_key)
    browser.click("#login-form button[type=submit]")
    browser.until(lambda: browser.find("#app").is_displayed(), "the cluster after logging in")

    node = browser.until(lambda: [t for t in browser.texts(f'#nodes tr[data-node="{cluster.node}"]') if "up" in t], "the node up")[0]
    assert "on" in browser.texts(f'#nodes tr[data-node="{cluster.node}"] td[data-label="TLS"]')
    assert "this machine" in node
    row = f'tr[data-worker="{cluster.worker["id"]}"]'
    browser.until(lambda: browser.find_all(row), "the real worker")
    assert browser.texts(f"{row} .model") == [cluster.model]
    assert browser.attr(row, "data-state") in ("idle", "busy")
    assert browser.texts(f"{row} .slots")[0].endswith(f"/{SLOTS}")

    # The playground: the loaded model is offered first; the answer grows as tokens arrive.
    browser.until(lambda: browser.prop("#play-model", "value") == cluster.model, "the loaded model in the playground")
    browser.driver.execute_script(WATCH_ANSWER)
    browser.fill("#play-max", "48")
    browser.fill("#play-prompt", "Write two sentences about honey bees.")
    browser.click("#play-send")
    browser.until(lambda: browser.attr("#play-transcript .msg.assistant", "data-done") == "1", "the answer finished", timeout=300)
    lengths = browser.driver.execute_script("return window.__answerLengths")
    growing = sorted({n for n in lengths if n > 0})
    answer = browser.texts("#play-transcript .msg.assistant .text")[0]
    assert len(growing) >= 2 and growing[-1] == len(answer), lengths
    assert answer.strip()
    figures = browser.find("#play-transcript .msg.assistant .figures")
    assert "TTFT" in figures.text and "tokens/s" in figures.text, figures.text
    assert int(figures.get_attribute("data-ttft-ms")) >= 0 and int(figures.get_attribute("data-tokens")) >= 2

    browser.screenshot("web-playground", 1280, 800)
    browser.screenshot("web-overview", 1280, 1560)  # the whole page (docs/img/web.png is one of these)
    browser.screenshot("web-playground", 390, 844, at="#playground")
    assert browser.overflows() == 0
    assert browser.console_errors() == []
