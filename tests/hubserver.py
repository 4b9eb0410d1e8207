"""A hub-like HTTP server on 127.0.0.1 for tests and benchmarks.

The real huggingface_hub client talks to it through ``HF_ENDPOINT``. It serves
repositories the test creates, with the headers the client relies on:

* ``HEAD|GET /{repo}/resolve/{rev}/{file}``: small files answer 200 with
  ``ETag`` = git blob sha1 and ``X-Repo-Commit``; large (LFS) files answer 302
  to a second origin (the "CDN" port) with ``X-Linked-Etag`` = sha256 and
  ``X-Linked-Size``, as the hub does.
* ``GET /api/models/{repo}[/revision/{rev}]`` (model info, ``?blobs=true`` adds
  sizes and LFS data) and ``GET /api/models/{repo}/tree/{rev}``.
* Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound,
  GatedRepo) so the client raises its typed errors.
* Range requests (206 + Content-Range, 416 past the end).
* Hostile names, as a malicious hub would serve them: a file named with dot
  segments (``../../tmp/x``) is also answered at the URL a client reaches
  once it has normalized those segments away.

Faults, queued per file and consumed one per body request: cut the connection
at a byte, stall at a byte (until released or the server stops), hold at a
byte until the test releases it, serve a corrupted body of the right length,
answer an HTTP status.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".onnx")
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 256 * 1024


@dataclass
class HubFile:
    path: str
    disk_path: Path
    size: int
    git_sha1: str
    sha256: str
    lfs: bool


@dataclass
class Repo:
    repo_id: str
    commit: str
    files: dict[str, HubFile]
    revisions: dict[str, str]
    # None (public), "private" (401 RepoNotFound without the token) or
    # "gated" (401 without a token, 403 with a wrong one; GatedRepo).
    access: str | None = None
    token: str | None = None


@dataclass
class Fault:
    """What happens to one body request. ``at`` is an absolute file offset."""

    kind: str  # "cut", "stall", "hold", "corrupt", "short", "status"
    at: int = 0
    status: int = 500
    times: int | None = 1  # None: every request
    release: threading.Event = field(default_factory=threading.Event)
    reached: threading.Event = field(default_factory=threading.Event)


@dataclass
class Record:
    role: str
    method: str
    path: str
    range: str | None
    status: int
    authorization: bool
    t: float
    sent: int = 0
    fault: str | None = None


def _git_sha1(path: Path, size: int) -> str:
    digest = hashlib.sha1(f"blob {size}\0".encode())
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class HubServer:
    def __init__(self, root: Path, lfs_min_size: int = LFS_MIN_SIZE) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lfs_min_size = lfs_min_size
        self.repos: dict[str, Repo] = {}
        # Normalized resolve URL path -> (repo, file) for names with dot segments.
        self.aliases: dict[str, tuple[str, str]] = {}
        self.records: list[Record] = []
        self.events: list[tuple[str, str, int, float]] = []  # (kind, file, offset, monotonic)
        self._faults: dict[tuple[str, str], deque[Fault]] = {}
        # Every fault ever queued, so that stop() releases held connections.
        self._all_faults: list[Fault] = []
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._servers: list[ThreadingHTTPServer] = []
        self.endpoint = ""
        self.cdn_endpoint = ""

    # --- lifecycle -------------------------------------------------------
    def start(self) -> "HubServer":
        for role in ("hub", "cdn"):
            server = _Server(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True
            server.hub = self  # type: ignore[attr-defined]
            server.role = role  # type: ignore[attr-defined]
            threading.Thread(target=server.serve_forever, name=f"hub-{role}", daemon=True).start()
            self._servers.append(server)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_endpoint = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            for fault in self._all_faults:
                fault.release.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- content ---------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | Path],
        *,
        revisions: tuple[str, ...] = ("main",),
        access: str | None = None,
        token: str | None = None,
    ) -> Repo:
        base = self.root / repo_id
        entries: dict[str, HubFile] = {}
        for name, content in files.items():
            if isinstance(content, Path):
                disk = content
            else:
                disk = base / name
                disk.parent.mkdir(parents=True, exist_ok=True)
                disk.write_bytes(content)
            size = disk.stat().st_size
            lfs = name.endswith(LFS_SUFFIXES) or size >= self.lfs_min_size
            entries[name] = HubFile(name, disk, size, _git_sha1(disk, size), _sha256(disk), lfs)
        commit = hashlib.sha1(
            json.dumps(sorted((f.path, f.git_sha1) for f in entries.values())).encode() + repo_id.encode()
        ).hexdigest()
        repo = Repo(repo_id, commit, entries, {rev: commit for rev in revisions}, access, token)
        with self._lock:
            self.repos[repo_id] = repo
            for name in entries:
                for rev in {*revisions, commit}:
                    canonical = f"/{repo_id}/resolve/{rev}/{name}"
                    normalized = posixpath.normpath(canonical)
                    if normalized != canonical:
                        self.aliases[normalized] = (repo_id, name)
        return repo

    def corrupt_on_disk(self, repo_id: str, name: str) -> None:
        """Change the served bytes for good while the metadata keeps the old hash."""
        disk = self.repos[repo_id].files[name].disk_path
        data = bytearray(disk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        disk.write_bytes(bytes(data))

    # --- faults ----------------------------------------------------------
    def add_fault(self, repo_id: str, name: str, fault: Fault) -> Fault:
        with self._lock:
            self._faults.setdefault((repo_id, name), deque()).append(fault)
            self._all_faults.append(fault)
        return fault

    def cut_at(self, repo_id: str, name: str, at: int, times: int | None = 1) -> Fault:
        return self.add_fault(repo_id, name, Fault("cut", at=at, times=times))

    def stall_at(self, repo_id: str, name: str, at: int, times: int | None = 1) -> Fault:
        return self.add_fault(repo_id, name, Fault("stall", at=at, times=times))

    def hold_at(self, repo_id: str, name: str, at: int) -> Fault:
        return self.add_fault(repo_id, name, Fault("hold", at=at))

    def corrupt_once(self, repo_id: str, name: str, times: int | None = 1) -> Fault:
        return self.add_fault(repo_id, name, Fault("corrupt", times=times))

    def short_once(self, repo_id: str, name: str, times: int | None = 1) -> Fault:
        """A complete response one byte short of the file (a size mismatch)."""
        return self.add_fault(repo_id, name, Fault("short", times=times))

    def status_once(self, repo_id: str, name: str, status: int, times: int | None = 1) -> Fault:
        return self.add_fault(repo_id, name, Fault("status", status=status, times=times))

    def clear_faults(self) -> None:
        with self._lock:
            for fault in self._all_faults:
                fault.release.set()
            self._faults.clear()

    def _take_fault(self, repo_id: str, name: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get((repo_id, name))
            if not queue:
                return None
            fault = queue[0]
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    queue.popleft()
            return fault

    # --- observations ----------------------------------------------------
    def body_requests(self, name: str | None = None) -> list[Record]:
        """GET requests that carried (or were meant to carry) file bytes."""
        out = []
        for rec in list(self.records):
            if rec.method != "GET" or rec.path.startswith("/api/"):
                continue
            if rec.role == "hub" and rec.status in (301, 302, 307):
                continue
            if name is None or rec.path.endswith("/" + quote(name)) or f"name={quote(name)}" in rec.path:
                out.append(rec)
        return out

    def _record(self, rec: Record) -> None:
        with self._lock:
            self.records.append(rec)

    def _event(self, kind: str, name: str, offset: int) -> None:
        with self._lock:
            self.events.append((kind, name, offset, time.monotonic()))


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that hang up mid-answer are part of the tests, not errors.
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_API_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_BLOB = re.compile(r"^/blobs/(?P<sha>[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubserver"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    @property
    def role(self) -> str:
        return self.server.role  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    # --- plumbing --------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        self._sent = 0
        self._fault_name: str | None = None
        self._status = 0
        # Recorded on arrival (a stalled request is visible while it hangs),
        # completed when the answer ends.
        record = Record(
            self.role, method, self.path, self.headers.get("Range"), 0,
            self.headers.get("Authorization") is not None, time.monotonic(),
        )
        self.hub._record(record)
        self._rec = record
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = parse_qs(split.query)
        try:
            if self.role == "cdn":
                match = _BLOB.match(path)
                if not match:
                    return self._error(404, "EntryNotFound", "not found")
                return self._serve_blob(method, match["sha"])
            if (m := _API_TREE.match(path)) is not None:
                return self._tree(m["repo"], unquote(m["rev"]), m["path"] or "", query)
            if (m := _API_INFO.match(path)) is not None:
                return self._info(m["repo"], unquote(m["rev"]) if m["rev"] else "main", query)
            if path in self.hub.aliases:
                repo_id, name = self.hub.aliases[path]
                return self._resolve(method, repo_id, "main", name)
            if (m := _RESOLVE.match(path)) is not None:
                return self._resolve(method, m["repo"], unquote(m["rev"]), m["file"])
            self._error(404, None, "Not found")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            record.status, record.sent, record.fault = self._status, self._sent, self._fault_name

    def _start(self, status: int, headers: dict[str, str]) -> None:
        self._status = status
        self._rec.status, self._rec.fault = status, self._fault_name
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        if code:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        headers.update(extra or {})
        self._start(status, headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload: object) -> None:
        body = json.dumps(payload).encode()
        self._start(200, {"Content-Type": "application/json", "Content-Length": str(len(body))})
        self.wfile.write(body)

    def _repo(self, repo_id: str, rev: str | None) -> tuple[Repo, str] | None:
        """The repo and commit, or None after answering with the error."""
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.access:
            auth = self.headers.get("Authorization") or ""
            if auth != f"Bearer {repo.token}":
                if repo.access == "gated":
                    status = 403 if auth else 401
                    self._error(status, "GatedRepo", "Access to this model is restricted; you must be authenticated and accept its conditions")
                else:
                    self._error(401, "RepoNotFound", "Repository not found")
                return None
        if rev is None:
            return repo, repo.commit
        commit = repo.revisions.get(rev) or (rev if rev == repo.commit else None)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, commit

    # --- API -------------------------------------------------------------
    def _info(self, repo_id: str, rev: str, query: dict[str, list[str]]) -> None:
        found = self._repo(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for f in repo.files.values():
            entry: dict[str, object] = {"rfilename": f.path}
            if blobs:
                entry["size"] = f.size
                entry["blobId"] = f.git_sha1
                if f.lfs:
                    entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(entry)
        self._json(
            {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": repo.access == "private",
                "gated": "auto" if repo.access == "gated" else False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _tree(self, repo_id: str, rev: str, prefix: str, query: dict[str, list[str]]) -> None:
        found = self._repo(repo_id, rev)
        if found is None:
            return
        repo, _ = found
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = prefix.strip("/")
        entries: list[dict[str, object]] = []
        folders: set[str] = set()
        for f in sorted(repo.files.values(), key=lambda x: x.path):
            if prefix and not f.path.startswith(prefix + "/"):
                continue
            rel = f.path[len(prefix) + 1 :] if prefix else f.path
            parts = rel.split("/")
            for i in range(1, len(parts)):
                folder = "/".join(([prefix] if prefix else []) + parts[:i])
                if folder not in folders and (recursive or i == 1):
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder})
            if len(parts) > 1 and not recursive:
                continue
            entry: dict[str, object] = {"type": "file", "oid": f.git_sha1, "size": f.size, "path": f.path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            entries.append(entry)
        self._json(entries)

    # --- files -----------------------------------------------------------
    def _resolve(self, method: str, repo_id: str, rev: str, name: str) -> None:
        found = self._repo(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        f = repo.files.get(name)
        if f is None:
            self._error(404, "EntryNotFound", f"{name} does not exist on \"{rev}\"", {"X-Repo-Commit": commit})
            return
        if f.lfs:
            location = f"{self.hub.cdn_endpoint}/blobs/{f.sha256}?name={quote(name)}&repo={quote(repo_id)}"
            self._start(
                302,
                {
                    "Location": location,
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "X-Linked-Size": str(f.size),
                    "ETag": f'"{hashlib.sha1(f.sha256.encode()).hexdigest()}"',
                    "Content-Length": "0",
                },
            )
            return
        self._send_file(method, repo_id, f, {"X-Repo-Commit": commit, "ETag": f'"{f.git_sha1}"'})

    def _serve_blob(self, method: str, sha: str) -> None:
        query = parse_qs(urlsplit(self.path).query)
        repo_id = query.get("repo", [""])[0]
        name = query.get("name", [""])[0]
        repo = self.hub.repos.get(repo_id)
        f = repo.files.get(name) if repo else None
        if f is None or f.sha256 != sha:
            self._error(404, "EntryNotFound", "blob not found")
            return
        self._send_file(method, repo_id, f, {"ETag": f'"{sha}"'})

    def _send_file(self, method: str, repo_id: str, f: HubFile, extra: dict[str, str]) -> None:
        start, end = 0, f.size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            m = _RANGE.match(range_header.strip())
            if not m or int(m.group(1)) >= f.size:
                self._error(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{f.size}"})
                return
            start = int(m.group(1))
            if m.group(2):
                end = min(int(m.group(2)), f.size - 1)
            status = 206
        fault = self.hub._take_fault(repo_id, f.path) if method == "GET" else None
        if fault is not None and fault.kind == "status":
            self._fault_name = "status"
            self._error(fault.status, None, f"injected {fault.status}")
            return
        if fault is not None and fault.kind == "short":
            end = max(start, end - 1)
        length = end - start + 1
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(length),
            "Accept-Ranges": "bytes",
            **extra,
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        self._fault_name = fault.kind if fault else None
        self._start(status, headers)
        if method == "HEAD":
            return
        with f.disk_path.open("rb") as fh:
            if fault is None:
                self._sent = self.connection.sendfile(fh, start, length)
                return
            fh.seek(start)
            if fault.kind == "short":
                self._copy(fh, length)
                return
            if fault.kind == "corrupt":
                self._write_corrupt(fh, start, length)
                return
            stop = min(max(fault.at, start), end + 1)
            self._copy(fh, stop - start)
            if fault.kind == "cut":
                self.hub._event("cut", f.path, stop)
                self._cut()
            elif fault.kind == "stall":
                self.hub._event("stall", f.path, stop)
                fault.reached.set()
                fault.release.wait()
                self._cut()
            elif fault.kind == "hold":
                self.hub._event("hold", f.path, stop)
                fault.reached.set()
                fault.release.wait()
                if self.hub.stopping.is_set():
                    self._cut()
                    return
                self._copy(fh, end + 1 - stop)

    def _copy(self, fh, count: int) -> None:
        while count > 0:
            block = fh.read(min(CHUNK, count))
            if not block:
                break
            self.wfile.write(block)
            self._sent += len(block)
            count -= len(block)

    def _write_corrupt(self, fh, start: int, length: int) -> None:
        flip_at = length // 2
        done = 0
        while done < length:
            block = bytearray(fh.read(min(CHUNK, length - done)))
            if not block:
                break
            if done <= flip_at < done + len(block):
                block[flip_at - done] ^= 0xFF
            self.wfile.write(bytes(block))
            done += len(block)
            self._sent += len(block)

    def _cut(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def make_blob(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


def write_blob(path: Path, size: int, seed: int = 0) -> Path:
    """A large deterministic file written in pieces (for benchmarks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = make_blob(min(size, 8 << 20), seed)
    with path.open("wb") as fh:
        left = size
        i = 0
        while left > 0:
            piece = block if i % 2 == 0 else block[::-1]
            fh.write(piece[:left])
            left -= min(left, len(piece))
            i += 1
    os.utime(path)
    return path
