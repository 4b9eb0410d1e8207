"""Confinement and private files: the one place that decides whether a path
lies inside a root, and that creates rbee's folders and files owner-only.

Names that come from outside (a hub's file list, a request field, a model
reference) never choose where rbee writes or what it loads: every such path
is joined under its root, resolved (links followed, so a link planted in the
tree cannot lead out of it) and checked to still lie inside the root.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from rbee.errors import RbeeError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
DEFAULT_CODE = "PATH_NOT_ALLOWED"


def relative_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be used as a relative path below a root, or None.

    Refused: empty names, absolute paths, backslashes (a separator elsewhere),
    NUL and other control characters, and empty, ``.`` or ``..`` components.
    """
    if not isinstance(name, str) or not name:
        return "empty name"
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        return "control character (NUL, newline, ...) in the name"
    if "\\" in name:
        return "backslash in the name"
    if name.startswith("/"):
        return "absolute path"
    for part in name.split("/"):
        if part == "":
            return "empty path component"
        if part in (".", ".."):
            return f"'{part}' path component"
    return None


def _refuse(code: str, what: str, shown: str, reason: str, roots: dict[str, str], details: dict[str, str] | None = None) -> RbeeError:
    return RbeeError(
        code,
        f"{what} {shown!r} is not allowed: {reason}",
        {"path": shown, **roots, "reason": reason, **(details or {})},
    )


def _resolve(path: Path) -> Path:
    # strict=False: the path may not exist yet (a file about to be written);
    # every link that does exist along it is followed.
    return Path(os.path.realpath(path))


def confined(root: Path, *parts: str, code: str = DEFAULT_CODE, what: str = "Path") -> Path:
    """``root / parts...`` after checking each part is a plain relative name
    and that the result, links followed, still lies inside ``root``.

    Returns the joined path (not resolved, so messages show the names rbee
    chose); raises RbeeError(``code``) when a part or the result escapes.
    """
    root = Path(root)
    for part in parts:
        problem = relative_name_problem(part)
        if problem is not None:
            raise _refuse(code, what, part, problem, {"root": str(root)})
    joined = root.joinpath(*parts)
    base = _resolve(root)
    resolved = _resolve(joined)
    if parts and (resolved == base or base not in resolved.parents):
        raise _refuse(code, what, "/".join(parts), f"resolves to {resolved}, outside {base}", {"root": str(root)})
    return joined


def within(roots: Iterable[Path], path: str | Path, code: str = DEFAULT_CODE, what: str = "Path",
           details: dict[str, str] | None = None) -> Path:
    """The resolved ``path`` when it lies below one of ``roots`` (links
    followed; a root itself is not a model, a source, ...), else
    RbeeError(``code``) naming the roots allowed."""
    roots = [Path(r) for r in roots]
    text = str(path)
    allowed = {"allowed": ", ".join(str(r) for r in roots) or "none"}
    if not text or "\x00" in text:
        raise _refuse(code, what, text.replace("\x00", "\\0"), "empty or holds a NUL byte", allowed, details)
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        raise _refuse(code, what, text, "not an absolute path", allowed, details)
    resolved = _resolve(candidate)
    for root in roots:
        if _resolve(root) in resolved.parents:
            return resolved
    where = f" (resolves to {resolved})" if str(resolved) != text else ""
    raise _refuse(code, what, text, f"outside {allowed['allowed']}{where}", allowed, details)


# --- owner-only folders and files ------------------------------------------------


def private_dir(path: Path, tighten: bool = True) -> Path:
    """Create ``path`` (and missing parents) mode 0700. An existing folder is
    set to 0700 when ``tighten`` and it belongs to this user; a folder of
    another user, or a shared one (sticky bit, like /tmp), is left alone."""
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(folder, PRIVATE_DIR_MODE)  # the umask cannot widen it, chmod says it outright
    if tighten and path not in missing:
        _tighten(path, PRIVATE_DIR_MODE)
    return path


def _tighten(path: Path, mode: int) -> None:
    try:
        st = os.stat(path)
    except OSError:
        return
    if st.st_uid != os.getuid() or st.st_mode & stat.S_ISVTX:
        return
    if stat.S_IMODE(st.st_mode) & ~mode:
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)


def private_file(path: Path) -> Path:
    """Make sure ``path`` exists with mode 0600 (created so, or narrowed)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)
    return path


def open_private(path: Path, mode: str = "a", encoding: str = "utf-8", errors: str = "replace"):
    """Open a text file for writing, created 0600 (an existing one narrowed to 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        return os.fdopen(fd, mode, encoding=encoding, errors=errors)
    except BaseException:
        os.close(fd)
        raise


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (replaced), mode 0600."""
    with open_private(path, "w") as fh:
        fh.write(text)
    return path

