"""`rbee-keeper install --system` as root from a user's virtual environment
(here owned by `nobody`) into a temporary prefix: /usr/local/bin gets
root-owned launchers, not links into that environment (which its user could
change and root would then run); the programs run from a root-owned copy;
config.toml is 0640. The user changing the environment afterwards changes
nothing root runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rbee.config import VERSION
from rbee_keeper.system_install import unsafe_for_root
from tests.fixtures.common import REPO, VENV_BIN

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a system install needs root")

NOBODY = 65534
PROGRAMS = ("rbee-keeper", "queen-rbee", "rbee-hive", "llm-worker-rbee")


def user_env(folder: Path) -> Path:
    """A small virtual environment that finds rbee (this checkout) and its
    dependencies (this checkout's .venv) through a .pth file, owned by a user."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())  # fmt: skip
    deps = subprocess.run([str(VENV_BIN / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    (site / "rbee-dev.pth").write_text(f"{REPO}\n{deps}\n")
    for path in [folder, *folder.rglob("*")]:
        os.lchown(path, NOBODY, NOBODY)
    return python


def test_system_install_copies_into_a_root_owned_place(tmp_path: Path) -> None:
    python = user_env(tmp_path / "user-venv")
    prefix = tmp_path / "root"
    install = [str(python), "-c", "import sys; from rbee_keeper.cli import main; sys.argv[0] = 'rbee-keeper'; main()",
               "install", "--system", "--prefix", str(prefix)]  # fmt: skip
    done = subprocess.run(install, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    unsafe = unsafe_for_root(REPO) or unsafe_for_root(VENV_BIN.parent)
    if unsafe:  # a checkout another user can change: the copy would still load it, so the install refuses
        assert done.returncode == 1 and "ACCESS_DENIED" in done.stderr and "rbee-dev.pth" in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stderr

    bin_dir = prefix / "usr/local/bin"
    for name in PROGRAMS:
        launcher = bin_dir / name
        assert not launcher.is_symlink(), f"{launcher} links to {os.readlink(launcher)}"
        st = launcher.stat()
        assert st.st_uid == 0 and st.st_mode & 0o777 == 0o755
        interpreter = Path(launcher.read_text().splitlines()[0].removeprefix("#!"))
        assert interpreter.parent.parent == prefix / "usr/local/lib/rbee"
    env = prefix / "usr/local/lib/rbee"
    assert unsafe_for_root(env) is None
    copied = next(env.glob("lib/python*/site-packages/rbee_keeper/cli.py"))
    assert copied.stat().st_uid == 0 and not copied.stat().st_mode & 0o022
    assert (prefix / "etc/rbee/config.toml").stat().st_mode & 0o777 == 0o640

    # The user now plants code in their environment: root's programs do not run it.
    marker = tmp_path / "MARKER"
    site = next((tmp_path / "user-venv").glob("lib/python*/site-packages"))
    (site / "planted.pth").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n")
    version = subprocess.run([str(bin_dir / "rbee-keeper"), "--version"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": ""})  # fmt: skip
    assert version.returncode == 0 and VERSION in version.stdout + version.stderr, version.stderr
    assert not marker.exists()

    # Again: only what changed is copied; the launchers stay.
    again = subprocess.run(install, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert again.returncode == 0 and "already runs the root-owned copy" in again.stderr, again.stderr


def test_an_interpreter_another_user_can_change_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "python"
    folder.mkdir()
    program = folder / "python3"
    program.write_text("#!/bin/sh\n")
    os.chown(program, NOBODY, NOBODY)
    assert "owned by uid 65534" in (unsafe_for_root(program) or "")
    program.chmod(0o777)
    os.chown(program, 0, 0)
    assert "writable by" in (unsafe_for_root(program) or "")
    program.chmod(0o755)
    assert unsafe_for_root(program) is None
