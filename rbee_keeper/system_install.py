"""The programs of a system install (`rbee-keeper install --system`): root
runs them, so nothing they load may be changed by another user. Linking
/usr/local/bin into a user's virtual environment would hand that user root:
instead the environment this keeper runs from is copied into a root-owned
place (PREFIX/usr/local/lib/rbee: a new virtual environment of the same
Python with a copy of its site-packages and of rbee's own packages, even when
rbee is installed editable), and /usr/local/bin gets small root-owned
launchers that run that copy. What the copy still reaches outside itself
(the Python interpreter, folders that .pth files add) must be root-owned and
writable by nobody else, or the install stops and says which path is not."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from rbee.errors import RbeeError

Say = Callable[..., None]
PACKAGES = ("rbee", "rbee_hive", "rbee_queen", "rbee_keeper", "rbee_worker")
ENV_DIR = "usr/local/lib/rbee"
_SKIP = ("__pycache__",)
_MARK = "runs the root-owned copy of rbee (rbee-keeper install --system)"


def unsafe_for_root(path: Path) -> str | None:
    """Why another user could change what ``path`` names (None: nobody but
    root can): every component, links followed, owned by root and not
    writable by group or others (a sticky folder such as /tmp excepted)."""
    try:
        target = path.resolve(strict=True)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    for part in [target, *target.parents]:
        st = part.lstat()
        if st.st_uid != 0:
            return f"{part} is owned by uid {st.st_uid}"
        sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        if st.st_mode & 0o022 and not sticky:
            return f"{part} is writable by {'group' if st.st_mode & 0o020 else 'others'} (mode {st.st_mode & 0o777:03o})"
    return None


def _refuse(what: str, why: str) -> RbeeError:
    return RbeeError(
        "ACCESS_DENIED",
        f"A system install cannot copy rbee into a root-owned place: {what} can be changed by another user ({why})",
        {"path": what, "reason": why},
        ["Install rbee with a root-owned Python (e.g. /usr/bin/python3 -m venv /opt/rbee as root), then run "
         "`sudo /opt/rbee/bin/rbee-keeper install --system` from it", "Or leave out --system: a user install needs no root"],
    )  # fmt: skip


def _copy_file(src: Path, dst: Path) -> bool:
    """Copy when missing or changed (size or time); group/others never write."""
    try:
        s, d = src.stat(), dst.lstat()
        if not stat.S_ISLNK(d.st_mode) and s.st_size == d.st_size and int(s.st_mtime) == int(d.st_mtime):
            return False
    except FileNotFoundError:
        pass
    if dst.is_symlink() or dst.is_dir():
        shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
    shutil.copy2(src, dst, follow_symlinks=True)
    os.chmod(dst, stat.S_IMODE(src.stat().st_mode) & 0o755)
    return True


def _copy_tree(src: Path, dst: Path, skip: Callable[[Path], bool] = lambda p: False) -> int:
    copied = 0
    dst.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(dst, 0o755)
    for entry in sorted(src.iterdir()):
        if entry.name in _SKIP or skip(entry):
            continue
        if entry.is_dir():
            copied += _copy_tree(entry, dst / entry.name)
        elif entry.is_file():
            copied += _copy_file(entry, dst / entry.name)
    return copied


def _pth_paths(pth: Path) -> list[Path]:
    return [Path(line.strip()) for line in pth.read_text(errors="replace").splitlines()
            if line.strip() and not line.startswith(("#", "import ", "import\t"))]  # fmt: skip


def _is_editable_hook(entry: Path) -> bool:
    return entry.name.startswith("__editable__")


def copy_environment(root: Path, say: Say) -> Path:
    """The environment this keeper runs from, copied to ``root/ENV_DIR``;
    returns the copy's Python."""
    base = Path(getattr(sys, "_base_executable", sys.executable))
    why = unsafe_for_root(base)
    if why:
        raise _refuse(str(base), why)
    site = Path(sysconfig.get_paths()["purelib"])
    for pth in site.glob("*.pth"):
        if _is_editable_hook(pth):
            continue
        for extra in _pth_paths(pth):
            extra = extra if extra.is_absolute() else site / extra
            why = extra.exists() and unsafe_for_root(extra)
            if why:
                raise _refuse(f"{extra} (added to the path by {pth.name})", why)
    env = root / ENV_DIR
    python = env / "bin" / "python"
    if not python.exists():
        say("🐍", f"Creating a root-owned Python environment in {env}")
        subprocess.run([str(base), "-m", "venv", "--without-pip", "--", str(env)], check=True, capture_output=True)
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip())  # fmt: skip
    say("📦", f"Copying {site} into {target} (changed files only)")
    copied = _copy_tree(site, target, skip=_is_editable_hook)
    for name in PACKAGES:
        module = sys.modules.get(name) or __import__(name)
        source = Path(module.__file__).parent
        if source.parent != site:  # an editable install: the packages live in the checkout
            copied += _copy_tree(source, target / name)
    say("✅", f"{env} holds rbee and its dependencies ({copied} files copied)")
    return python


def write_launchers(bin_dir: Path, python: Path, programs: tuple[str, ...], say: Say) -> None:
    """Root-owned launchers (0755, not links) that run ``python``'s copy of rbee."""
    scripts = {ep.name: ep for ep in metadata.distribution("rbee").entry_points if ep.group == "console_scripts"}
    for name in programs:
        ep = scripts.get(name)
        if ep is None:
            say("⚠️", f"{name} is not a program of this rbee: not installed")
            continue
        module, _, attr = ep.value.partition(":")
        text = (f"#!{python}\n# rbee {name}: {_MARK}\n"
                f"import sys\nfrom {module} import {attr}\nsys.exit({attr}())\n")  # fmt: skip
        path = bin_dir / name
        if path.is_symlink():  # what earlier versions made: a link into an environment
            path.unlink()
            say("🔁", f"Replaced the link {path} with a launcher of the root-owned copy")
        elif path.exists() and path.read_text(errors="replace") != text:
            if _MARK not in path.read_text(errors="replace"):
                say("⚠️", f"{path} exists and is not a launcher made by rbee: left as it is")
                continue
            path.unlink()
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
            with os.fdopen(fd, "w") as out:
                out.write(text)
            say("🚀", f"Installed {path} → {python.parent.parent}")
        else:
            say("✅", f"{path} already runs the root-owned copy")
        os.chmod(path, 0o755)
