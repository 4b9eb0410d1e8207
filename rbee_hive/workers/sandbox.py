"""What code in a worker may read of its hive (docs/security.md).

A worker runs a model's code and an engine: it must not read the hive's keys
(``hive.key``, the TLS key and issuing key), its catalogs, nor the hive's
memory or environment (``/proc/<hive>/environ``). Where the kernel has
Landlock, each worker restricts itself before it execs (in
``rbee_hive.workers.launch``, the one place between fork and exec where Python
may run): everything stays open except the hive's home and key files, of
which only the model folders, the worker environments and the worker's own
certificate are open again. A Landlock-restricted process may also not trace
(nor read the memory or environment of) any process outside its own sandbox:
the hive, or another worker.

Landlock rules only grant, so "everything but X" is built by opening every
sibling along the path from ``/`` down to X. Entries created later beside
those paths stay closed to the worker (default deny).

The policy travels from the hive to the launcher in ``RBEE_WORKER_SANDBOX``
(JSON: ``deny`` and ``allow`` paths; nothing secret).
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

ENV = "RBEE_WORKER_SANDBOX"

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # same on x86_64 and aarch64
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# Filesystem rights by the Landlock ABI that brought them.
_EXECUTE, _WRITE_FILE, _READ_FILE = 1 << 0, 1 << 1, 1 << 2
_ABI1 = (1 << 13) - 1  # execute .. make_sym
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or it is off)."""
    try:
        libc = _libc()
        libc.syscall.restype = ctypes.c_long
        version = libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(int(version), 0)


def handled_rights(abi: int) -> int:
    rights = _ABI1
    if abi >= 2:
        rights |= _REFER
    if abi >= 3:
        rights |= _TRUNCATE
    if abi >= 5:
        rights |= _IOCTL_DEV
    return rights


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def open_paths(deny: Iterable[Path], allow: Iterable[Path] = ()) -> list[Path]:
    """The paths to grant so that everything is reachable except what lies
    under ``deny``, with the ``allow`` paths inside denied ones open again
    (an allowed path that holds a denied one is open but for it)."""
    denied = [Path(os.path.realpath(d)) for d in deny if os.path.lexists(d)]
    real = [Path(os.path.realpath(a)) for a in allow if os.path.exists(a)]
    exceptions = [a for a in real if any(_inside(a, d) for d in denied)]
    granted: set[Path] = {Path("/"), *exceptions}
    for target in denied:
        for top in [g for g in granted if _inside(target, g)]:
            granted.discard(top)
            granted |= _around(top, target, denied)
    # Drop what a later denial closed, but not what lies in an exception.
    return sorted(
        g for g in granted if not any(_inside(g, d) for d in denied) or any(_inside(g, e) for e in exceptions)
    )


def _around(top: Path, target: Path, denied: list[Path]) -> set[Path]:
    """Every entry below ``top`` beside the path down to ``target``."""
    out: set[Path] = set()
    here = top
    for part in target.relative_to(top).parts:
        try:
            children = list(os.scandir(here))
        except OSError:
            children = []
        for child in children:
            if child.name == part:
                continue
            path = Path(child.path)
            if child.is_symlink():
                real = Path(os.path.realpath(path))
                if any(_inside(real, d) or _inside(d, real) for d in denied):
                    continue  # a link into (or above) what is closed stays closed
            out.add(path)
        here = here / part
    return out


def policy(deny: Iterable[Path], allow: Iterable[Path]) -> str:
    return json.dumps({"deny": [str(p) for p in deny], "allow": [str(p) for p in allow]})


def restrict(spec: str) -> int:
    """Restrict this process (and what it execs) to the policy ``spec``;
    returns the ABI used. Raises OSError when the kernel refuses."""
    data = json.loads(spec)
    abi = landlock_abi()
    if abi <= 0:
        raise OSError("this kernel has no Landlock")
    rights = handled_rights(abi)
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    attr = _RulesetAttr(rights)
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        for path in open_paths([Path(p) for p in data["deny"]], [Path(p) for p in data["allow"]]):
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # gone, or not ours to open: stays closed
            try:
                mode = os.fstat(fd).st_mode
                if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                    continue  # sockets, pipes, devices beside the closed paths: nothing to read there
                allowed = rights if stat.S_ISDIR(mode) else rights & _FILE_RIGHTS
                rule = _PathBeneath(allowed, fd)
                # A path the kernel will not take a rule for stays closed (never more open).
                libc.syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0))
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
    return abi


def worker_paths(settings, tls_dir: Path | None, tmp_dir: Path | None) -> tuple[list[Path], list[Path]]:
    """What a worker of this hive may not read (``deny``) and what inside that
    it may (``allow``): closed are the hive's home and every key file it was
    given; open again are the model folders, the worker environments
    (``$RBEE_HOME/workers``), the worker's own certificate and its temp folder."""
    from rbee.config import rbee_home

    deny = [settings.rbee_home, rbee_home()]
    for key in (settings.api_key_file, settings.tls_key, settings.tls_issuer_key):
        if key:
            deny.append(Path(key).expanduser())
    allow = [*settings.model_roots, settings.rbee_home / "workers"]
    allow += [p for p in (tls_dir, tmp_dir) if p is not None]
    return deny, allow


def temp_is_closed(deny: Iterable[Path]) -> bool:
    """Whether the system's temp folder lies above something closed (then the
    worker could not create files in it, and gets a folder of its own)."""
    import tempfile

    tmp = Path(os.path.realpath(tempfile.gettempdir()))
    return any(tmp in Path(os.path.realpath(d)).parents for d in deny)


def describe(abi: int, user: str) -> str:
    """What protects the hive from its workers on this host, for the hive's log."""
    if abi > 0:
        return (
            f"Workers run in a Landlock sandbox (ABI {abi}): they cannot read the hive's home beyond models, "
            "worker environments and their own certificate, nor its key files, nor the memory of the hive or of "
            "another worker; the hive's environment block holds no secrets"
        )
    return (
        f"This kernel has no Landlock: workers run as {user} like the hive, and code in a worker (a model's own "
        "code, an engine bug) can read the hive's home, key files and memory"
    )


def scrub_environ_block(secret: Callable[[str], bool]) -> list[str]:
    """Blank the secrets in this process's initial environment block (what
    ``/proc/<pid>/environ`` shows other processes), keeping them in
    ``os.environ`` and the C library's copy. Returns the names blanked."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        # Fields 50 and 51 of stat (env_start, env_end), counted after the command name.
        start, end = int(fields[47]), int(fields[48])
    except (OSError, ValueError, IndexError):
        return []
    if not 0 < start < end:
        return []
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        block = mem.read(end - start)
        cleaned = bytearray(block)
        names: list[str] = []
        offset = 0
        for entry in block.split(b"\0"):
            name = entry.partition(b"=")[0].decode(errors="replace")
            if entry and secret(name):
                names.append(name)
                value = os.environ.get(name)
                if value is not None:
                    os.putenv(name, value)  # the C library's own copy, off the block
                cleaned[offset : offset + len(entry)] = b"\0" * len(entry)
            offset += len(entry) + 1
        if names:
            mem.seek(start)
            mem.write(bytes(cleaned))
    return names
