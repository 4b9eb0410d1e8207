"""The queen's web page (docs/web.md) in Debian's headless Chromium against
real processes: a queen serving HTTP, this machine as a local node whose hive
the queen starts, workers of the real worker program on a fake engine
(tests/unit/worker/fake_worker_main.py: the real servicer, fast), models from
the hub-like server. Everything the page shows arrives through its one event
stream: the test never reloads the page.

The playground against a real engine of the default model is in
test_web_playground.py (it shares the session's real cluster).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.fixtures.browser import Page
from tests.fixtures.common import REPO
from tests.fixtures.hive import free_port_block
from tests.fixtures.models import HOLD_STALL_S, hive_env
from tests.fixtures.queen import QueenProc, kill_node_hives

pytestmark = pytest.mark.asyncio(loop_scope="session")

HUB_REPO = "rbee-test/web-tiny"
HUB_REF = f"hf:{HUB_REPO}"
WEIGHTS = "model.safetensors"
# Above the hub's LFS threshold (a redirect and a byte stream, as the hub serves weights).
FILES = {"config.json": b'{"model_type": "llama"}', WEIGHTS: b"\0" * 12_000_000, "tokenizer.json": b"{}"}
HOLD_AT = 4_000_000


def fake_worker_program(folder: Path) -> Path:
    """llm-worker-rbee as the hive runs it, with the fake engine behind the real server."""
    folder.mkdir(parents=True, exist_ok=True)
    program = folder / "llm-worker-rbee"
    program.write_text(f'#!/bin/sh\ncd "{REPO}"\nexec "{sys.executable}" -m tests.unit.worker.fake_worker_main "$@"\n')
    program.chmod(0o755)
    return program


def login(page: Page, url: str, key: str) -> None:
    page.open(url)
    page.fill("#login-key", key)
    page.find("#login-form button[type=submit]").click()


def worker_row(page: Page, worker_id: str) -> bool:
    return bool(page.find_all(f'tr[data-worker="{worker_id}"]'))


async def test_the_page_follows_the_cluster_live(queen_factory, hub, browser: Page, tmp_path: Path) -> None:
    hub.add_repo(HUB_REPO, FILES)
    hold = hub.hold_at(HUB_REPO, WEIGHTS, HOLD_AT)
    models = tmp_path / "models"
    folder = models / "tiny-folder"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    http_port = free_port_block(1)
    env = hive_env(
        hub, RBEE_DOWNLOAD_STALL_TIMEOUT_S=str(HOLD_STALL_S), RBEE_HIVE_WORKER_BINARY=str(fake_worker_program(tmp_path / "bin")),
        RBEE_HIVE_WATCH_HEARTBEAT="0.3s", RBEE_HIVE_MODEL_DIRS=str(models), RBEE_QUEEN_HTTP_PORT=str(http_port),
    )  # fmt: skip
    queen: QueenProc = await queen_factory(**env)
    node_home = tmp_path / "node"
    url = f"http://127.0.0.1:{http_port}/"
    try:
        code, _, err = await queen.keeper("setup", "add-node", "--name", "here", "--local", "--rbee-home", str(node_home),
                                          "--hive-port", str(free_port_block(1)))  # fmt: skip
        assert code == 0, err
        code, _, err = await queen.keeper("setup", "check-node", "--name", "here")
        assert code == 0, err

        # A wrong key is refused (the only console error of the test: the browser logs the 401).
        login(browser, url, "not-the-key")
        browser.until(lambda: browser.find("#login-error").is_displayed(), "the login error")
        assert "refused" in browser.text("#login-error")
        assert not browser.find("#app").is_displayed()
        refused = browser.console_errors()
        assert len(refused) == 1 and "/api/web/me" in refused[0]["message"] and "401" in refused[0]["message"], refused
        seen = len(browser.console())

        # The admin key logs in; the node is there, up, with its hive's figures.
        admin = (queen.home / "queen.key").read_text().strip()
        browser.fill("#login-key", admin)
        browser.find("#login-form button[type=submit]").click()
        browser.until(lambda: browser.find("#app").is_displayed(), "the cluster after logging in")
        assert browser.text("#scope") == "admin"
        node = browser.until(lambda: [t for t in browser.texts('#nodes tr[data-node="here"]') if "up" in t], "the node up")[0]
        assert "this machine" in node and "cpu" in node and "%" in node  # memory and disk used/total

        # A worker started from the CLI appears without a reload, with its model, state and slots.
        code, out, err = await queen.keeper("workers", "spawn", "--node", "here", "--model", str(folder),
                                            "--model-ref", "hf:rbee-test/folder", "--slots", "3")  # fmt: skip
        assert code == 0, err
        first_id = out.split()[0]
        row = f'tr[data-worker="{first_id}"]'
        browser.until(lambda: browser.attr(row, "data-state") == "idle", f"worker {first_id} idle")
        assert browser.texts(f"{row} .model") == ["hf:rbee-test/folder"]
        assert browser.texts(f"{row} .node") == ["here"]
        assert browser.texts(f"{row} .slots") == ["0/3"]
        # The hive's idle timeout (5 minutes by default) from the worker's last request.
        browser.until(lambda: browser.texts(f"{row} .idle")[0].endswith(" left"), "the keep-alive left")

        # A download started from the page shows its progress, then the model is in the list.
        browser.select("#download-node", "here")
        browser.fill("#download-model", HUB_REF)
        browser.find("#download-form button[type=submit]").click()

        def progress() -> tuple[int, int] | None:
            bars = browser.find_all("#downloads progress")
            value = int(bars[0].get_attribute("value") or 0) if bars else 0
            return (value, int(bars[0].get_attribute("max"))) if value else None

        done, total = browser.until(progress, "a download's progress bar above zero")
        assert 0 < done < total  # held part-way by the hub
        assert "%" in browser.text("#downloads .figures")
        browser.screenshot("web-download", 1280, 800)
        hold.release.set()
        browser.until(lambda: browser.find_all(f'#model-rows tr[data-node="here"][data-model="{HUB_REF}"]'), "the downloaded model")
        browser.until(lambda: not browser.find_all("#downloads progress"), "the bar gone once done")
        assert browser.attr('#activity-list li[data-kind="download"]', "data-state") == "done"

        # A task from the CLI: its cold start narrated in the activity, a second worker live.
        code, out, err = await queen.keeper("infer", "--node", "here", "--model", HUB_REF, "--prompt", "hi", "--max-tokens", "3")
        assert code == 0, err
        task = browser.until(lambda: browser.texts('#activity-list li[data-kind="task"][data-state="done"]'), "the task")[0]
        assert "Cold start: no worker serves" in task
        second_id = browser.until(lambda: [i for i in browser.driver.execute_script(
            "return [...document.querySelectorAll('tr[data-worker]')].map(r => r.dataset.worker)") if i != first_id], "the second worker")[0]
        assert browser.texts(f'tr[data-worker="{second_id}"] .model') == [HUB_REF]

        # The hive's log, followed live.
        browser.select("#logs-node", "here")
        browser.select("#logs-source", "rbee-hive")
        browser.click("#logs-follow")
        browser.until(lambda: "rbee-hive |" in browser.text("#logs-output"), "the hive's log")

        browser.screenshot("web-cluster", 1280, 800)
        phone = browser.screenshot("web-cluster", 390, 844)
        assert browser.overflows() == 0, "the page scrolls sideways on a phone"
        browser.size(1280, 800)

        # The admin stops the second worker from the page: it goes, the first stays.
        browser.click(f'button[data-stop="{second_id}"]')
        browser.until(lambda: not worker_row(browser, second_id), "the stopped worker gone")
        stopped = browser.until(lambda: browser.texts('#activity-list li[data-kind="stop"][data-state="done"]'), "the stop recorded")[0]
        assert f"Stop worker {second_id} on here" in stopped and "exited with code 0" in stopped
        assert worker_row(browser, first_id)
        code, out, err = await queen.keeper("workers", "list", "--json")
        assert [json.loads(line)["id"] for line in out.splitlines()] == [first_id], err

        # Stopped from the CLI: gone from the page too.
        code, _, err = await queen.keeper("workers", "shutdown", "--node", "here", "--id", first_id)
        assert code == 0, err
        browser.until(lambda: not worker_row(browser, first_id), "the CLI-stopped worker gone")
        browser.until(lambda: browser.find("#workers-empty").is_displayed(), "no workers")

        assert browser.console_errors(seen) == []
        assert phone.stat().st_size > 0
    finally:
        kill_node_hives(node_home)


async def test_an_inference_key_sees_but_cannot_act(queen_factory, browser: Page, tmp_path: Path) -> None:
    http_port = free_port_block(1)
    queen: QueenProc = await queen_factory(RBEE_QUEEN_HTTP_PORT=str(http_port))
    code, out, err = await queen.keeper("keys", "create", "--name", "viewer", "--scope", "inference")
    assert code == 0, err
    viewer = out.strip()
    login(browser, f"http://127.0.0.1:{http_port}/", viewer)
    browser.until(lambda: browser.find("#app").is_displayed(), "the page for a read-only key")
    assert "read only" in browser.text("#scope")
    assert not browser.find("#download-form").is_displayed()
    assert not browser.find("#logs").is_displayed()  # logs are the admin's
    browser.until(lambda: "live" == browser.text("#live"), "the live feed")
    # The server refuses the actions whatever the page shows.
    status = browser.driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch('/api/web/workers/stop', {method: 'POST', headers: {'Authorization': 'Bearer ' + sessionStorage.getItem('rbee.key'),
          'Content-Type': 'application/json'}, body: JSON.stringify({node: 'n', worker_id: 'w'})}).then(r => done(r.status));"""
    )
    assert status == 403
