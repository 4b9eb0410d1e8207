"""Steps shared by models_catalog.feature and models_download.feature (S5.1,
S5.2): a hub-like server, a real hive pointed at it, rbee-keeper runs."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from pytest_bdd import given, parsers, then, when

from features.steps.models_support import KeeperRun, SyncHive, keeper, keeper_process
from rbee.enum_words import MODEL_FORMATS
from rbee_hive.provisioner.downloads import STAGING_DIR
from tests.fixtures.models import HOLD_ENV, fill_disk, partial_bytes, wait_for_partial, write_gguf
from tests.hubserver import make_blob

TINY = make_blob(3_000_000, seed=11)
CONFIG = b'{"model_type": "llama"}'


class S5:
    def __init__(self, tmp_path: Path, hub) -> None:
        self.tmp = tmp_path
        self.hub = hub
        self.hives: list[SyncHive] = []
        self.mounts: list[Path] = []
        self.run = None
        self.runs: list = []
        self.threads: list[threading.Thread] = []
        self.fault = None
        self.entry = None
        self.error = None
        self.lines: list[str] = []

    @property
    def hive(self) -> SyncHive:
        return self.hives[-1]

    @property
    def home(self) -> Path:
        return self.tmp / "hive-home"

    def start_hive(self, extra_env: dict[str, str] | None = None) -> SyncHive:
        hive = SyncHive(self.home, self.hub.endpoint, extra_env)
        self.hives.append(hive)
        return hive

    def hold(self, repo: str, at: int) -> None:
        """The hub pauses ``repo``'s model after ``at`` bytes until released.
        A pause is not a stall: the running hive is restarted with the long
        stall timeout, so a slow step in between cannot turn it into a retry."""
        self.fault = self.hub.hold_at(repo, "model.safetensors", at)
        if self.hives and self.hives[-1].proc.poll() is None:
            self.hives[-1].stop()
            self.start_hive(HOLD_ENV)

    def close(self) -> None:
        if self.fault is not None:
            self.fault.release.set()
        for thread in self.threads:
            thread.join(120)
        for hive in self.hives:
            hive.stop()
        for mount in self.mounts:
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture
def s5(tmp_path, hub):
    state = S5(tmp_path, hub)
    yield state
    state.close()


# --- hub and hive ------------------------------------------------------------


@given(parsers.parse('a hub serving the repository "{repo}" with a 3.0 MB safetensors model'))
def _hub_tiny(s5, repo):
    s5.hub.add_repo(repo, {"config.json": CONFIG, "model.safetensors": TINY})


@given("a hive on this node whose hub is that server")
def _hive(s5):
    s5.start_hive()


@given(parsers.parse('the hub holds "{repo}" as a {access} repository'))
def _hub_access(s5, repo, access):
    if access != "missing":
        s5.hub.add_repo(repo, {"model.safetensors": TINY}, access=access, token="hf_secret")


@given(parsers.parse('the hub stalls "{repo}" once after {at:d} bytes'))
def _stall_once(s5, repo, at):
    s5.hub.stall_at(repo, "model.safetensors", at)


@given(parsers.parse('the hub stalls "{repo}" every time after {at:d} bytes'))
def _stall_always(s5, repo, at):
    s5.hub.stall_at(repo, "model.safetensors", at, times=None)


@given(parsers.parse('the hub cuts the connection of "{repo}" once after {at:d} bytes'))
def _cut_once(s5, repo, at):
    s5.hub.cut_at(repo, "model.safetensors", at)


@given(parsers.parse('the hub corrupts the body of "{repo}" once'))
def _corrupt_once(s5, repo):
    s5.hub.corrupt_once(repo, "model.safetensors")


@given(parsers.parse('the hub pauses "{repo}" after {at:d} bytes'))
def _pause(s5, repo, at):
    s5.hold(repo, at)


@given(parsers.parse('the hub serves a 1.5 MB model "{repo}" that pauses after {at:d} bytes'))
def _mid_model(s5, repo, at):
    s5.hub.add_repo(repo, {"model.safetensors": make_blob(1_500_000, seed=12)})
    s5.hold(repo, at)


@given("the hive's models folder is a 2 MB filesystem")
def _small_disk(s5):
    models = s5.home / "models"
    models.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(models)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs (needs root): {done.stderr.strip()}")
    s5.mounts.append(models)


@given(parsers.parse('the hub also serves a GGUF file "{ref}" with vocabulary {vocab:d} and EOS id {eos:d}'))
def _hub_gguf(s5, ref, vocab, eos):
    org, repo, name = ref.split("/", 2)
    path = write_gguf(s5.tmp / "gguf" / name, vocab=vocab, eos=eos, file_type=7)
    s5.hub.add_repo(f"{org}/{repo}", {name: path})


@given(parsers.parse('the model "{ref}" is already in the catalog'))
def _already(s5, ref):
    _, entry, error = s5.hive.download(ref)
    assert error is None and entry is not None


@given(parsers.parse('the hub serves a 12 MB model "{repo}" that pauses half-way'))
def _big(s5, repo):
    s5.big = make_blob(12_000_000, seed=13)
    s5.hub.add_repo(repo, {"model.safetensors": s5.big})
    s5.hold(repo, 6_000_000)


# --- actions ---------------------------------------------------------------


@when(parsers.parse('I run rbee-keeper models download "{ref}"'))
def _download(s5, ref):
    s5.run = keeper("models", "download", ref, hive=s5.hive.address)


@when(parsers.parse('I run rbee-keeper models download "{ref}" against a hive that is not running'))
def _download_nowhere(s5, ref):
    s5.run = keeper("models", "download", ref, hive="127.0.0.1:9")


@when(parsers.parse('I run rbee-keeper models rm "{ref}"'))
def _rm(s5, ref):
    s5.run = keeper("models", "rm", ref, hive=s5.hive.address)


@when(parsers.parse('I start rbee-keeper models download "{ref}"'))
def _start_download(s5, ref):
    s5.proc = keeper_process("models", "download", ref, "--hive", s5.hive.address)
    assert s5.fault.reached.wait(120)


@when("the disk fills up while the download is paused")
def _fill(s5):
    fill_disk(s5.mounts[-1], leave_bytes=200_000)
    s5.fault.release.set()
    try:
        s5.proc.finish()
        s5.run = KeeperRun(s5.proc.proc.returncode, s5.proc.stdout, s5.proc.stderr)
    finally:
        s5.proc.kill()


@when(parsers.parse('two rbee-keeper downloads of "{ref}" run at once'))
def _two(s5, ref):
    first = keeper_process("models", "download", ref, "--hive", s5.hive.address)
    second = None
    try:
        assert s5.fault.reached.wait(120)
        second = keeper_process("models", "download", ref, "--hive", s5.hive.address)
        second.wait_for_stderr("already being downloaded")
        s5.fault.release.set()
        first.finish()
        second.finish()
        s5.runs = [KeeperRun(p.proc.returncode, p.stdout, p.stderr) for p in (first, second)]
    finally:
        first.kill()
        if second is not None:
            second.kill()


@when(parsers.parse('the hive is asked for "{ref}"'))
def _ask(s5, ref):
    s5.lines, s5.entry, s5.error = s5.hive.download(ref)


@when(parsers.parse('the hive is downloading "{ref}"'))
def _downloading(s5, ref):
    def go():
        s5.lines, s5.entry, s5.error = s5.hive.download(ref)

    thread = threading.Thread(target=go)
    thread.start()
    s5.threads.append(thread)
    assert s5.fault.reached.wait(120)
    wait_for_partial(s5.home / "models" / STAGING_DIR)


@when("the hive is killed with SIGKILL")
def _kill(s5):
    s5.hive.kill9()
    s5.fault.release.set()
    for thread in s5.threads:
        thread.join(120)
    assert s5.entry is None, "the interrupted download returned no entry"
    s5.on_disk = partial_bytes(s5.home / "models" / STAGING_DIR)


@when(parsers.parse('the hive is started again and asked for "{ref}"'))
def _restart(s5, ref):
    s5.start_hive()
    s5.lines, s5.entry, s5.error = s5.hive.download(ref)


# --- outcomes --------------------------------------------------------------


@then(parsers.parse("rbee-keeper exits with {code:d}"))
def _exit(s5, code):
    assert s5.run.code == code, f"stdout:\n{s5.run.stdout}\nstderr:\n{s5.run.stderr}"


@then("stdout holds the model's folder on the node")
def _stdout_folder(s5):
    assert s5.run.stdout.strip() == str(s5.home / "models" / "hf" / "acme--tiny")


@then(parsers.parse('rbee-keeper models list shows "{ref}" as {fmt} of {size}'))
def _listed(s5, ref, fmt, size):
    run = keeper("models", "list", hive=s5.hive.address)
    assert run.code == 0
    [row] = [line for line in run.stdout.splitlines() if line.startswith(ref)]
    assert fmt in row and size in row


@then("rbee-keeper models list shows no models")
def _listed_none(s5):
    run = keeper("models", "list", hive=s5.hive.address)
    assert run.code == 0 and run.stdout == "" and "No models" in run.stderr


@then("the model's folder is gone")
def _gone(s5):
    assert not (s5.home / "models" / "hf" / "acme--tiny").exists()


@then(parsers.parse('stderr says "{text}"'))
def _stderr_says(s5, text):
    assert text in s5.run.stderr, s5.run.stderr


@then("stderr lists the accepted forms")
def _forms(s5):
    assert "hf:ORG/REPO" in s5.run.stderr and "file:///absolute/path" in s5.run.stderr


@then(parsers.parse("stderr shows download progress ending at 100.0% of {size} with a speed"))
def _progress(s5, size):
    lines = [line for line in s5.run.stderr.splitlines() if "⏬" in line]
    assert lines, s5.run.stderr
    assert re.search(rf"100\.0% {re.escape(size)} / {re.escape(size)} · [\d.]+ [kMG]?B/s", lines[-1]), lines[-1]


@then(parsers.parse('nothing is registered for "{ref}"'))
def _nothing(s5, ref):
    assert ref not in [m.model_ref for m in s5.hive.list_models()]


@then(parsers.parse("the retry asked the hub for the bytes from {at:d} on"))
def _range(s5, at):
    assert s5.hub.body_requests("model.safetensors")[-1].range == f"bytes={at}-"


@then("stderr narrates retries 1 to 6 with growing waits")
def _six(s5):
    waits = [int(m.group(1)) for m in re.finditer(r"retry \d/6 in (\d+) ms", s5.run.stderr)]
    assert len(waits) == 6 and waits == sorted(waits), s5.run.stderr


@then("the model on disk matches the hub's bytes")
def _bytes(s5):
    assert (s5.home / "models" / "hf" / "acme--tiny" / "model.safetensors").read_bytes() == TINY


@then("both exit with 0 and print the same folder")
def _both(s5):
    a, b = s5.runs
    assert a.code == 0 and b.code == 0, (a.stderr, b.stderr)
    assert a.stdout == b.stdout


@then("the second one says it follows the download already running")
def _second_joined(s5):
    assert "already being downloaded" in s5.runs[1].stderr


@then("the hub sent the model's bytes once")
def _once(s5):
    assert len(s5.hub.body_requests("model.safetensors")) == 1


@then("the hub sent no model bytes")
def _no_bytes(s5):
    assert s5.hub.body_requests() == []


@then("no partial file is left")
def _no_partial(s5):
    assert not list((s5.home / "models").rglob("*.part"))


@then(parsers.parse('the catalog entry has format "{fmt}"'))
def _format(s5, fmt):
    assert s5.error is None and MODEL_FORMATS.word(s5.entry.weights_format) == fmt


@then(parsers.parse('its metadata says architecture "{arch}", vocabulary {vocab:d}, EOS id {eos:d}, quantization "{quant}"'))
def _gguf_meta(s5, arch, vocab, eos, quant):
    meta = s5.entry.metadata
    assert (meta["gguf.architecture"], meta["gguf.vocab_size"], meta["gguf.eos_token_id"], meta["gguf.quantization"]) == (
        arch, str(vocab), str(eos), quant,
    )


@then("the catalog file passes SQLite's integrity check")
def _integrity(s5):
    with sqlite3.connect(s5.home / "models.db") as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@then(parsers.parse('the catalog holds "{kept}" and nothing for "{lost}"'))
def _holds(s5, kept, lost):
    from rbee_hive.catalog.models import ModelCatalog

    catalog = ModelCatalog(s5.home / "models.db")
    try:
        refs = [r.model_ref for r in catalog.list()]
    finally:
        catalog.close()
    assert refs == [kept]


@then("the download resumes from the bytes on disk and completes")
def _resumed(s5):
    assert s5.error is None and s5.entry is not None
    assert s5.on_disk > 0
    assert s5.hub.body_requests("model.safetensors")[-1].range == f"bytes={s5.on_disk}-"
    assert (Path(s5.entry.local_path) / "model.safetensors").read_bytes() == s5.big
