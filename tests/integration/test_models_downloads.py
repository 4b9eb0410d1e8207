"""Downloads through the real huggingface_hub client against the hub-like
server: every error path of S5.2, resume, verification, sharing, disk."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from rbee_hive.provisioner.downloads import STAGING_DIR
from tests.fixtures.models import (HOLD_STALL_S, Collected, collect, fill_disk, make_provisioner, small_filesystem,
                                   wait_for_partial, write_gguf)
from tests.hubserver import make_blob

BLOB = make_blob(3_000_000, seed=1)
CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}).encode()


def tiny_repo(hub, repo="acme/tiny", **kw):
    return hub.add_repo(
        repo,
        {"config.json": CONFIG, "model.safetensors": BLOB, "pytorch_model.bin": b"x" * 1000, "tokenizer.json": b"{}"},
        **kw,
    )


def nothing_registered(prov, home: Path) -> None:
    assert prov.catalog.list() == []
    assert not (home / "models" / "hf").exists() or not any((home / "models" / "hf").iterdir())


def retries(c: Collected) -> list[str]:
    return [line for line in c.narration if "🔁" in line]


async def test_a_repository_is_downloaded_verified_and_registered(tmp_path, hub):
    tiny_repo(hub)
    prov = make_provisioner(tmp_path, hub)
    c = await collect(prov.download("hf:acme/tiny"))
    assert c.error is None, c.text
    rec = c.record
    folder = Path(rec.local_path)
    assert rec.provider == "hf" and rec.reference == "acme/tiny" and rec.format == "safetensors"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (folder / "model.safetensors").read_bytes() == BLOB
    assert rec.size_bytes == len(BLOB) + len(CONFIG) + 2
    assert rec.metadata["commit"] == hub.repos["acme/tiny"].commit
    assert prov.catalog.get("hf", "acme/tiny") == rec
    # Progress: bytes of the whole model, ending complete.
    assert c.progress[-1].done == c.progress[-1].total == rec.size_bytes
    assert not (tmp_path / "models" / STAGING_DIR / "acme--tiny").exists()
    # The second request is answered from the catalog, without a byte.
    before = len(hub.records)
    again = await collect(prov.download("hf:acme/tiny"))
    assert again.record == rec and len(hub.records) == before
    assert "is in the catalog" in again.text


async def test_one_gguf_file_with_its_header_metadata(tmp_path, hub):
    gguf = write_gguf(tmp_path / "src" / "m.Q8_0.gguf", vocab=100, eos=7, file_type=7)
    hub.add_repo("acme/tiny-gguf", {"m.Q8_0.gguf": gguf, "m.F16.gguf": gguf, "README.md": b"# tiny"})
    prov = make_provisioner(tmp_path, hub)
    c = await collect(prov.download("hf:acme/tiny-gguf/m.Q8_0.gguf"))
    assert c.error is None, c.text
    rec = c.record
    assert rec.format == "gguf" and rec.local_path.endswith("m.Q8_0.gguf")
    assert rec.metadata["gguf"] == {
        "architecture": "llama", "vocab_size": 100, "eos_token_id": 7, "quantization": "Q8_0",
        "parameter_count": 800, "context_length": 256, "name": "tiny test model", "tensor_count": 1,
    }
    # The whole repository holds two GGUF files: the user must name one.
    whole = await collect(prov.download("hf:acme/tiny-gguf"))
    assert whole.error.code == "INVALID_MODEL_REF" and "m.F16.gguf" in whole.error.details["files"]


@pytest.mark.parametrize(
    ("ref", "what"),
    [
        ("hf:acme/nope", "repository acme/nope does not exist"),
        ("hf:acme/tiny/missing.gguf", "file 'missing.gguf' does not exist"),
        ("hf:acme/tiny@v9", "revision 'v9' does not exist"),
    ],
)
async def test_not_found(tmp_path, hub, ref, what):
    tiny_repo(hub)
    prov = make_provisioner(tmp_path, hub)
    c = await collect(prov.download(ref))
    assert c.error.code == "MODEL_NOT_FOUND"
    assert ref in c.error.message and what in c.error.message
    assert hub.body_requests() == []
    nothing_registered(prov, tmp_path)


@pytest.mark.parametrize(("access", "status"), [("private", 401), ("gated", 401)])
async def test_access_denied_suggests_hf_token(tmp_path, hub, access, status):
    tiny_repo(hub, "acme/locked", access=access, token="hf_right")
    prov = make_provisioner(tmp_path, hub)
    c = await collect(prov.download("hf:acme/locked"))
    assert c.error.code == "ACCESS_DENIED", c.error
    assert f"HTTP {status}" in c.error.message
    assert any("HF_TOKEN" in s for s in c.error.suggestions)
    nothing_registered(prov, tmp_path)


async def test_a_stall_is_retried_and_resumes_from_the_bytes_on_disk(tmp_path, hub):
    tiny_repo(hub)
    hub.stall_at("acme/tiny", "model.safetensors", 1_000_000)
    prov = make_provisioner(tmp_path, hub)
    c = await collect(prov.download("hf:acme/tiny"))
    assert c.error is None, c.text
    assert Path(c.record.local_path, "model.safetensors").read_bytes() == BLOB
    [line] = retries(c)
    assert "stalled" in line and "retry 1/6" in line and "resuming from 1.0 MB" in line
    first, second = hub.body_requests("model.safetensors")
    assert first.fault == "stall" and second.range == "bytes=1000000-" and second.status == 206


async def test_a_model_that_always_stalls_times_out_after_six_retries(tmp_path, hub):
    tiny_repo(hub)
    hub.stall_at("acme/tiny", "model.safetensors", 500_000, times=None)
    prov = make_provisioner(tmp_path, hub)
    c = await collect(prov.download("hf:acme/tiny"))
    assert c.error.code == "DOWNLOAD_TIMEOUT", c.text
    assert "7 attempts" in c.error.message
    lines = retries(c)
    assert [f"retry {i}/6" in line for i, line in enumerate(lines, 1)] == [True] * 6
    # Backoff 100, 200, ... 3200 ms (jitter ±20 %), narrated.
    waits = [int(line.split(" in ")[1].split(" ms")[0]) for line in lines]
    for wait, nominal in zip(waits, [100, 200, 400, 800, 1600, 3200]):
        assert 0.8 * nominal <= wait <= 1.2 * nominal
    assert len(hub.body_requests("model.safetensors")) == 7
    nothing_registered(prov, tmp_path)
    # The partial stays for the next attempt.
    parts = list((tmp_path / "models" / STAGING_DIR).rglob("*.part"))
    assert [p.stat().st_size for p in parts] == [500_000]


async def test_a_cut_connection_resumes_with_a_range_request(tmp_path, hub):
    tiny_repo(hub)
    hub.cut_at("acme/tiny", "model.safetensors", 2_000_000)
    prov = make_provisioner(tmp_path, hub)
    c = await collect(prov.download("hf:acme/tiny"))
    assert c.error is None, c.text
    assert "connection lost" in retries(c)[0] and "resuming from 2.0 MB" in retries(c)[0]
    first, second = hub.body_requests("model.safetensors")
    assert first.sent == 2_000_000 and second.range == "bytes=2000000-" and second.sent == 1_000_000
    assert Path(c.record.local_path, "model.safetensors").read_bytes() == BLOB


async def test_a_connection_cut_every_time_fails_after_six_retries(tmp_path, hub):
    tiny_repo(hub)
    hub.cut_at("acme/tiny", "model.safetensors", 0, times=None)
    prov = make_provisioner(tmp_path, hub)
    c = await collect(prov.download("hf:acme/tiny"))
    assert c.error.code == "DOWNLOAD_FAILED" and "connection lost" in c.error.details["last_error"]
    assert len(retries(c)) == 6
    nothing_registered(prov, tmp_path)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
async def test_a_corrupted_body_is_deleted_and_fetched_again(tmp_path, hub, name):
    """LFS files are checked against their sha256, the others against their git sha1."""
    tiny_repo(hub)
    hub.corrupt_once("acme/tiny", name)
    prov = make_provisioner(tmp_path, hub)
    c = await collect(prov.download("hf:acme/tiny"))
    assert c.error is None, c.text
    [line] = retries(c)
    assert "checksum mismatch, partial file deleted" in line
    first, second = hub.body_requests(name)
    assert first.fault == "corrupt" and second.range is None, "the retry starts from zero"
    expected = BLOB if name == "model.safetensors" else CONFIG
    assert Path(c.record.local_path, name).read_bytes() == expected


async def test_a_short_body_is_a_size_mismatch(tmp_path, hub):
    tiny_repo(hub)
    hub.short_once("acme/tiny", "model.safetensors")
    prov = make_provisioner(tmp_path, hub)
    c = await collect(prov.download("hf:acme/tiny"))
    assert c.error is None, c.text
    assert "size 2999999 bytes, expected 3000000" in retries(c)[0]


async def test_bytes_that_never_match_fail_the_download(tmp_path, hub):
    tiny_repo(hub)
    hub.corrupt_on_disk("acme/tiny", "model.safetensors")
    prov = make_provisioner(tmp_path, hub)
    c = await collect(prov.download("hf:acme/tiny"))
    assert c.error.code == "DOWNLOAD_FAILED" and "sha256" in c.error.details["last_error"]
    nothing_registered(prov, tmp_path)
    assert not list((tmp_path / "models").rglob("*.part")), "mismatching bytes are not kept"


async def test_server_errors_are_retried(tmp_path, hub):
    tiny_repo(hub)
    hub.status_once("acme/tiny", "model.safetensors", 503)
    prov = make_provisioner(tmp_path, hub)
    c = await collect(prov.download("hf:acme/tiny"))
    assert c.error is None and "server error" in retries(c)[0]


async def test_two_requests_share_one_download(tmp_path, hub):
    tiny_repo(hub)
    hold = hub.hold_at("acme/tiny", "model.safetensors", 1_000_000)
    prov = make_provisioner(tmp_path, hub, stall_timeout_s=HOLD_STALL_S)
    first = asyncio.create_task(collect(prov.download("hf:acme/tiny")))
    await asyncio.to_thread(hold.reached.wait, 60)
    second = asyncio.create_task(collect(prov.download("hf:acme/tiny")))
    while not prov.jobs._jobs["hf:acme/tiny"].subscribers == 2:
        await asyncio.sleep(0.01)
    hold.release.set()
    a, b = await asyncio.gather(first, second)
    assert a.error is None and b.error is None
    assert a.record == b.record
    assert "already being downloaded" in b.text
    assert len(hub.body_requests("model.safetensors")) == 1
    assert len(prov.catalog.list()) == 1


async def test_a_cancelled_download_keeps_its_partial_and_resumes(tmp_path, hub):
    tiny_repo(hub)
    hold = hub.hold_at("acme/tiny", "model.safetensors", 1_500_000)
    prov = make_provisioner(tmp_path, hub, stall_timeout_s=HOLD_STALL_S)
    task = asyncio.create_task(collect(prov.download("hf:acme/tiny")))
    await asyncio.to_thread(hold.reached.wait, 60)
    await asyncio.to_thread(wait_for_partial, tmp_path / "models" / STAGING_DIR)
    job = prov.jobs._jobs["hf:acme/tiny"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The transfer stops at its next chunk; let the held connection go on.
    hold.release.set()
    await job.finished.wait()
    nothing_registered(prov, tmp_path)
    [part] = list((tmp_path / "models" / STAGING_DIR).rglob("*.part"))
    kept = part.stat().st_size
    assert 0 < kept <= 1_500_000
    c = await collect(prov.download("hf:acme/tiny"))
    assert c.error is None, c.text
    resumed = hub.body_requests("model.safetensors")[-1]
    assert resumed.range == f"bytes={kept}-"
    assert "Resuming" in c.text
    assert Path(c.record.local_path, "model.safetensors").read_bytes() == BLOB


async def test_offline_mode_serves_the_catalog_only(tmp_path, hub):
    tiny_repo(hub)
    online = make_provisioner(tmp_path, hub)
    assert (await collect(online.download("hf:acme/tiny"))).error is None
    offline = make_provisioner(tmp_path, hub, offline=True)
    before = len(hub.records)
    assert (await collect(offline.download("hf:acme/tiny"))).record is not None
    c = await collect(offline.download("hf:acme/other"))
    assert c.error.code == "HUB_OFFLINE" and "HF_HUB_OFFLINE" in c.error.message
    assert len(hub.records) == before


async def test_local_files_are_registered_in_place(tmp_path, hub):
    gguf = write_gguf(tmp_path / "mine" / "local.gguf", vocab=50, eos=3)
    prov = make_provisioner(tmp_path / "home", hub, extra_roots=[tmp_path / "mine"])
    c = await collect(prov.download(f"file://{gguf}"))
    assert c.error is None
    assert c.record.provider == "file" and c.record.local_path == str(gguf)
    assert c.record.format == "gguf" and c.record.metadata["gguf"]["vocab_size"] == 50
    await prov.remove(f"file://{gguf}")
    assert gguf.exists() and prov.catalog.list() == []
    missing = await collect(prov.download(f"file://{tmp_path}/mine/not-there.gguf"))
    assert missing.error.code == "MODEL_NOT_FOUND"


async def test_local_files_outside_the_model_folders_are_not_registered(tmp_path, hub):
    """file:// names a path on the node; only the model folders the operator
    allows are registered (S13), so the catalog cannot be used to reach /etc."""
    outside = write_gguf(tmp_path / "elsewhere" / "local.gguf", vocab=50, eos=3)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "link.gguf").symlink_to(outside)
    prov = make_provisioner(tmp_path / "home", hub, extra_roots=[tmp_path / "mine"])
    for ref in (f"file://{outside}", "file:///etc", f"file://{tmp_path}/mine/link.gguf"):
        c = await collect(prov.download(ref))
        assert c.error is not None and c.error.code == "PATH_NOT_ALLOWED", (ref, c.error)
        assert c.error.details["allowed"] == f"{tmp_path / 'home' / 'models'}, {tmp_path / 'mine'}"
    assert prov.catalog.list() == []


async def test_remove_deletes_the_files(tmp_path, hub):
    tiny_repo(hub)
    prov = make_provisioner(tmp_path, hub)
    c = await collect(prov.download("hf:acme/tiny"))
    folder = Path(c.record.local_path)
    removed = await prov.remove("hf:acme/tiny")
    assert removed.reference == "acme/tiny" and not folder.exists() and prov.catalog.list() == []


async def test_insufficient_disk_is_refused_before_any_byte(tmp_path, hub):
    tiny_repo(hub)
    with small_filesystem(tmp_path / "home" / "models", "2m"):
        prov = make_provisioner(tmp_path / "home", hub)
        c = await collect(prov.download("hf:acme/tiny"))
        assert c.error.code == "INSUFFICIENT_DISK", c.text
        assert float(c.error.details["required_mb"]) == pytest.approx(3.0, abs=0.01)
        assert float(c.error.details["to_free_mb"]) >= 0.9
        assert any("rbee-keeper models rm" in s for s in c.error.suggestions)
        assert hub.body_requests() == []
        nothing_registered(prov, tmp_path / "home")


async def test_disk_full_midway_removes_the_partial(tmp_path, hub):
    blob = make_blob(1_500_000, seed=2)
    hub.add_repo("acme/mid", {"model.safetensors": blob})
    hold = hub.hold_at("acme/mid", "model.safetensors", 400_000)
    models = tmp_path / "home" / "models"
    with small_filesystem(models, "2m"):
        prov = make_provisioner(tmp_path / "home", hub, stall_timeout_s=HOLD_STALL_S)
        task = asyncio.create_task(collect(prov.download("hf:acme/mid")))
        await asyncio.to_thread(hold.reached.wait, 60)
        # Something else fills the disk while the download is under way.
        filler = fill_disk(models, leave_bytes=200_000)
        hold.release.set()
        c = await task
        assert c.error.code == "DISK_FULL", c.text
        assert "Disk full during download" in c.error.message and "partial file was deleted" in c.error.message
        assert not list(models.rglob("*.part"))
        assert len(hub.body_requests("model.safetensors")) == 1, "disk full is not retried"
        nothing_registered(prov, tmp_path / "home")
        filler.unlink()
        shutil.rmtree(models / STAGING_DIR, ignore_errors=True)
        prov.catalog.close()


async def test_a_gguf_model_is_imported_for_the_cpu_engine(tmp_path, hub, smollm2_gguf):
    """The real SmolLM2 GGUF through the hub: header metadata stored, then
    imported once into a folder the cpu engine loads (recorded as loadable_path)."""
    from rbee_hive.gguf_import import is_imported

    hub.add_repo("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", {smollm2_gguf.name: smollm2_gguf})
    prov = make_provisioner(tmp_path, hub)
    ref = f"hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/{smollm2_gguf.name}"
    c = await collect(prov.download(ref, backend="cpu"))
    assert c.error is None, c.text
    rec = c.record
    assert rec.format == "gguf" and rec.metadata["gguf"]["quantization"] == "Q4_1"
    loadable = Path(rec.metadata["loadable_path"])
    assert is_imported(loadable) and (loadable / "config.json").is_file()
    assert prov.loadable_path(rec, "cpu") == loadable and prov.loadable_path(rec, "cuda") == Path(rec.local_path)
    assert "cannot load GGUF directly" in c.text
    # Asked again, the import is not repeated.
    again = await collect(prov.download(ref, backend="cpu"))
    assert again.record.metadata["loadable_path"] == str(loadable) and "importing" not in again.text
    # Removing the model removes the imported folder with it.
    await prov.remove(ref)
    assert not loadable.exists()


async def test_ensure_for_the_spawn_flow(tmp_path, hub):
    tiny_repo(hub)
    prov = make_provisioner(tmp_path, hub)
    events = []
    rec = await prov.ensure("hf:acme/tiny", "cpu", events.append)
    assert prov.loadable_path(rec, "cpu") == Path(rec.local_path)
    assert any(e.HasField("progress") for e in events) and any(e.HasField("narration") for e in events)
    assert (await prov.ensure("hf:acme/tiny", "cpu")) == rec


async def test_an_unreachable_hub_fails_after_narrated_retries(tmp_path):
    from rbee_hive.catalog.models import ModelCatalog
    from rbee_hive.provisioner.models import ModelProvisioner
    from rbee_hive.provisioner.settings import DownloadSettings

    # Nothing listens on port 9 of the loopback interface.
    prov = ModelProvisioner(ModelCatalog(tmp_path / "models.db"), tmp_path / "models", DownloadSettings(endpoint="http://127.0.0.1:9"))
    c = await collect(prov.download("hf:acme/tiny"))
    assert c.error.code == "DOWNLOAD_FAILED" and "7 attempts" in c.error.message
    assert len(retries(c)) == 6 and all("connection lost" in line for line in retries(c))
    assert prov.catalog.list() == []
