"""Models through a real rbee-hive process and rbee-keeper: progress on the
keeper's stderr, errors with their codes and exit 1, shared downloads, disk
full, and the catalog surviving a kill -9 in the middle of a download."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import pytest

from rbee_hive.catalog.models import ModelCatalog
from rbee_hive.provisioner.downloads import STAGING_DIR
from tests.fixtures.hive import HIVE_KEY
from tests.fixtures.models import HOLD_ENV, HiveModels, fill_disk, partial_bytes, small_filesystem, wait_for_partial
from tests.hubserver import make_blob

pytestmark = pytest.mark.asyncio(loop_scope="session")

BLOB = make_blob(6_000_000, seed=3)


def add_tiny(hub, repo="acme/tiny", **kw):
    return hub.add_repo(repo, {"config.json": b'{"model_type": "llama"}', "model.safetensors": BLOB}, **kw)


def keeper_models(keeper, hive, *args, key=HIVE_KEY, env=None):
    return keeper("models", *args, "--hive", hive.address, "--api-key", key, env=env)


async def finish(proc) -> int:
    return await asyncio.to_thread(proc.finish)


async def test_keeper_downloads_with_progress_lists_and_removes(hub, hub_hive, keeper):
    add_tiny(hub)
    hub.cut_at("acme/tiny", "model.safetensors", 2_500_000)
    hive = await hub_hive()
    dl = keeper_models(keeper, hive, "download", "hf:acme/tiny")
    assert await finish(dl) == 0, dl.describe()
    folder = hive.home / "models" / "hf" / "acme--tiny"
    assert dl.stdout.strip() == str(folder)
    err = dl.stderr
    assert "[rbee-hive] 📥 Downloading hf:acme/tiny" in err
    assert "connection lost" in err and "retry 1/6" in err and "resuming from 2.5 MB" in err
    # Without a terminal the bar becomes lines: percent, size, speed.
    assert "100.0% 6.0 MB / 6.0 MB" in err and "/s" in err.split("100.0%")[1].splitlines()[0]
    assert (folder / "model.safetensors").read_bytes() == BLOB

    listed = keeper_models(keeper, hive, "list")
    assert await finish(listed) == 0
    assert "hf:acme/tiny" in listed.stdout and "safetensors" in listed.stdout and "6.0 MB" in listed.stdout

    rm = keeper_models(keeper, hive, "rm", "hf:acme/tiny")
    assert await finish(rm) == 0, rm.describe()
    assert "Removed hf:acme/tiny" in rm.stderr and not folder.exists()
    empty = keeper_models(keeper, hive, "list")
    assert await finish(empty) == 0 and empty.stdout == "" and "No models" in empty.stderr


async def test_keeper_shows_a_bar_on_a_terminal(hub, hub_hive, keeper):
    add_tiny(hub)
    hive = await hub_hive()
    dl = keeper_models(keeper, hive, "download", "hf:acme/tiny", env={"TTY_COMPATIBLE": "1", "COLUMNS": "160"})
    assert await finish(dl) == 0, dl.describe()
    final = dl.stderr.rsplit("\r", 1)[-1]
    assert "━" in dl.stderr, "a bar was drawn"
    assert "100%" in dl.stderr and "6.0 MB/6.0 MB" in dl.stderr and "MB/s" in dl.stderr, final


async def test_keeper_validates_the_reference_before_sending(keeper, tmp_path):
    # Nothing listens on this port: a request would fail with HIVE_UNREACHABLE.
    bad = keeper("models", "download", "hf:only-one-part", "--hive", "127.0.0.1:9", "--api-key", "k")
    assert await finish(bad) == 1
    assert "INVALID_MODEL_REF: Invalid model reference format: 'hf:only-one-part'" in bad.stderr
    assert "file:///absolute/path" in bad.stderr and "UNAVAILABLE" not in bad.stderr and "UNREACHABLE" not in bad.stderr


@pytest.mark.parametrize(
    ("setup", "ref", "code", "words"),
    [
        (lambda hub: None, "hf:acme/nope", "MODEL_NOT_FOUND", "repository acme/nope does not exist"),
        (lambda hub: add_tiny(hub, "acme/private", access="private", token="hf_ok"), "hf:acme/private", "ACCESS_DENIED", "HTTP 401"),
        (lambda hub: add_tiny(hub, "acme/gated", access="gated", token="hf_ok"), "hf:acme/gated", "ACCESS_DENIED", "gated"),
    ],
)
async def test_keeper_reports_hub_errors(hub, hub_hive, keeper, setup, ref, code, words):
    setup(hub)
    hive = await hub_hive()
    dl = keeper_models(keeper, hive, "download", ref)
    assert await finish(dl) == 1
    assert f"❌ {code}:" in dl.stderr and words in dl.stderr and "Traceback" not in dl.stderr
    if code == "ACCESS_DENIED":
        assert "Set HF_TOKEN" in dl.stderr
    assert await HiveModels(hive).list() == []


async def test_hf_token_on_the_node_opens_gated_models(hub, hub_hive, keeper):
    add_tiny(hub, "acme/gated", access="gated", token="hf_right")
    wrong = await hub_hive(extra_env={"HF_TOKEN": "hf_wrong"})
    dl = keeper_models(keeper, wrong, "download", "hf:acme/gated")
    assert await finish(dl) == 1
    assert "ACCESS_DENIED" in dl.stderr and "HTTP 403" in dl.stderr and "has no access" in dl.stderr
    right = await hub_hive(extra_env={"HF_TOKEN": "hf_right"})
    ok = keeper_models(keeper, right, "download", "hf:acme/gated")
    assert await finish(ok) == 0, ok.describe()
    assert all(r.authorization for r in hub.records if r.role == "hub" and r.path.startswith("/acme/gated"))


async def test_keeper_reports_a_download_timeout_after_narrated_retries(hub, hub_hive, keeper):
    add_tiny(hub)
    hub.stall_at("acme/tiny", "model.safetensors", 1_000_000, times=None)
    hive = await hub_hive()
    dl = keeper_models(keeper, hive, "download", "hf:acme/tiny")
    assert await finish(dl) == 1
    for i in range(1, 7):
        assert f"retry {i}/6" in dl.stderr
    assert "❌ DOWNLOAD_TIMEOUT" in dl.stderr and "7 attempts" in dl.stderr
    assert await HiveModels(hive).list() == []


async def test_wrong_api_key_names_the_hive(hub, hub_hive, keeper):
    hive = await hub_hive()
    dl = keeper_models(keeper, hive, "list", key="not-the-key")
    assert await finish(dl) == 1
    assert "INVALID_API_KEY" in dl.stderr and hive.address in dl.stderr


async def test_two_keepers_share_one_download(hub, hub_hive, keeper):
    add_tiny(hub)
    hold = hub.hold_at("acme/tiny", "model.safetensors", 1_000_000)
    hive = await hub_hive(extra_env=HOLD_ENV)
    first = keeper_models(keeper, hive, "download", "hf:acme/tiny")
    await asyncio.to_thread(hold.reached.wait, 120)
    second = keeper_models(keeper, hive, "download", "hf:acme/tiny")
    await asyncio.to_thread(second.wait_for_stderr, "already being downloaded")
    hold.release.set()
    assert await finish(first) == 0 and await finish(second) == 0
    assert first.stdout == second.stdout
    assert len(hub.body_requests("model.safetensors")) == 1
    assert len(await HiveModels(hive).list()) == 1


async def test_disk_full_during_a_download_through_the_hive(hub, hub_hive, keeper, tmp_path):
    hub.add_repo("acme/mid", {"model.safetensors": make_blob(1_500_000, seed=4)})
    hold = hub.hold_at("acme/mid", "model.safetensors", 300_000)
    home = tmp_path / "hive-home"
    with small_filesystem(home / "models", "2m") as models:
        hive = await hub_hive(home=home, extra_env=HOLD_ENV)
        dl = keeper_models(keeper, hive, "download", "hf:acme/mid")
        await asyncio.to_thread(hold.reached.wait, 120)
        fill_disk(models, leave_bytes=200_000)
        hold.release.set()
        assert await finish(dl) == 1
        assert "❌ DISK_FULL: Disk full during download of hf:acme/mid" in dl.stderr
        assert not list(models.rglob("*.part"))
        assert await HiveModels(hive).list() == []
        await hive.close()


async def test_catalog_survives_kill_9_mid_download_and_the_retry_completes(hub, hub_hive, tmp_path):
    home = tmp_path / "hive-home"
    add_tiny(hub, "acme/done")
    big = make_blob(12_000_000, seed=5)
    hub.add_repo("acme/big", {"config.json": b"{}", "model.safetensors": big})
    hold = hub.hold_at("acme/big", "model.safetensors", 6_000_000)

    hive = await hub_hive(home=home, extra_env=HOLD_ENV)
    models = HiveModels(hive)
    assert (await models.download("hf:acme/done")).record is not None
    downloading = asyncio.create_task(models.download("hf:acme/big"))
    await asyncio.to_thread(hold.reached.wait, 120)
    # The hive has been writing the partial file; kill it without warning.
    await asyncio.to_thread(wait_for_partial, home / "models" / STAGING_DIR)
    hive.proc.send_signal(signal.SIGKILL)
    await hive.proc.wait()
    broken = await downloading
    assert broken.error is not None and broken.record is None
    hold.release.set()

    with sqlite3.connect(home / "models.db") as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    catalog = ModelCatalog(home / "models.db")
    assert [r.reference for r in catalog.list()] == ["acme/done"]
    catalog.close()
    on_disk = partial_bytes(home / "models" / STAGING_DIR)
    assert on_disk > 0

    restarted = await hub_hive(home=home)
    retry = await HiveModels(restarted).download("hf:acme/big")
    assert retry.error is None, retry.text
    assert "Resuming" in retry.text
    last = hub.body_requests("model.safetensors")[-1]
    assert last.range == f"bytes={on_disk}-" and last.status == 206
    assert (Path(retry.record.local_path) / "model.safetensors").read_bytes() == big
    assert sorted(m.reference for m in await HiveModels(restarted).list()) == ["acme/big", "acme/done"]
