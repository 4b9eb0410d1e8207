"""`rbee-keeper install [--system]`: put the programs on PATH, make the
folders and write a default config file (S11).

User install: ~/.local/bin, ~/.config/rbee/, ~/.local/share/rbee/models/.
The programs are linked to this installation, so an update of the
installation updates them.
System install: /usr/local/bin, /etc/rbee/ (config.toml 0640), /var/lib/rbee/
(needs root). Root runs these programs, so they are root-owned launchers of a
root-owned copy of this environment in /usr/local/lib/rbee
(rbee_keeper/system_install.py), never links into a user's environment; run
it again after an update (it copies what changed).
``--prefix DIR`` puts everything under DIR (DIR/usr/local/bin, ...), where it
runs as it is: a staging root, and how the tests install into a temporary folder.
An existing config file is never overwritten (one every user could read loses
that); running install again changes nothing that is already right.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from rbee_keeper.common import run

PROGRAMS = ("rbee-keeper", "queen-rbee", "rbee-hive", "llm-worker-rbee")

DEFAULT_CONFIG = """\
# rbee configuration (TOML). Settings: a command-line option beats the
# environment, which beats this file. Lookup: $RBEE_CONFIG,
# ~/.config/rbee/config.toml, /etc/rbee/config.toml (the first found).

[keeper]
# The node commands use when --node is not given (RBEE_NODE).
# node = "workstation"
# The queen as HOST:PORT (RBEE_QUEEN); default 127.0.0.1:7800.
# queen = "127.0.0.1:7800"
# The hive for direct use as HOST:PORT (RBEE_HIVE); default 127.0.0.1:7900.
# hive = "127.0.0.1:7900"
# Mutual TLS to a daemon named by hand (RBEE_TLS): auto (beyond loopback), on, off.
# tls = "auto"

[remote]
# Where rbee lives on the nodes (absolute paths there): the queen installs to
# repo_dir on nodes added without --install-path.
# repo_dir = "/opt/rbee"
# hive_program = "/opt/rbee/.venv/bin/rbee-hive"

[queen]
# port = 7800
# State (beehives.db, queen.key); default ~/.rbee.
# home = "{data}"

[hive]
# port = 7900
# State and models (models.db, models/); default ~/.rbee.
# home = "{data}"
"""


@dataclass(frozen=True)
class Layout:
    bin: Path
    config: Path
    data: Path

    @property
    def config_file(self) -> Path:
        return self.config / "config.toml"


def layout(system: bool, prefix: Path | None = None, home: Path | None = None) -> Layout:
    """Where things go. ``prefix`` is prepended to the system paths (a staging
    root whose programs run from there); a user install follows HOME."""
    if system:
        root = prefix or Path("/")
        return Layout(root / "usr/local/bin", root / "etc/rbee", root / "var/lib/rbee")
    base = prefix or home or Path.home()
    return Layout(base / ".local/bin", base / ".config/rbee", base / ".local/share/rbee")


def _existing_ancestor(path: Path) -> Path:
    while not os.path.exists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable(where: Layout, system: bool) -> None:
    from rbee.errors import RbeeError

    for folder in (where.bin, where.config, where.data):
        place = _existing_ancestor(folder)
        if not os.access(place, os.W_OK | os.X_OK):
            raise RbeeError(
                "ACCESS_DENIED",
                f"Cannot write {folder}: {place} is not writable by {_user()}"
                + (" (a system install needs root)" if system else ""),
                {"path": str(folder), "not_writable": str(place)},
                ["Run it as root: sudo rbee-keeper install --system", "Or leave out --system: a user install needs no root"]
                if system
                else [f"Make {place} writable by you, or set HOME"],
            )


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


def _link(target: Path, link: Path, say) -> None:
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            say("✅", f"{link} already links to {target}")
            return
        link.unlink()
        link.symlink_to(target)
        say("🔗", f"{link} now links to {target}")
    elif link.exists():
        say("⚠️", f"{link} exists and is not a link made by rbee: left as it is")
    else:
        link.symlink_to(target)
        say("🔗", f"Linked {link} → {target}")


def do_install(system: bool, prefix: Path | None) -> int:
    from rbee_keeper.output import say

    where = layout(system, prefix)
    check_writable(where, system)
    for folder, mode in ((where.bin, 0o755), (where.config, 0o755), (where.data, 0o700), (where.data / "models", 0o700)):
        if folder.is_dir():
            say("✅", f"{folder} exists")
        else:
            folder.mkdir(parents=True, mode=mode)
            say("📁", f"Created {folder}")
    if system:
        from rbee_keeper.system_install import copy_environment, write_launchers

        if os.geteuid() != 0:
            say("⚠️", f"Not running as root: the files under {where.bin.parent.parent} are yours, not root's; "
                "chown them to root before root runs them")  # fmt: skip
        write_launchers(where.bin, copy_environment(where.bin.parents[2], say), PROGRAMS, say)
    else:
        programs = Path(sys.executable).parent
        for name in PROGRAMS:
            target = programs / name
            if target.exists():
                _link(target, where.bin / name, say)
            else:
                say("⚠️", f"{target} not found: {name} not linked")
    # A system config file is root's, readable by root's group: 0640 (0600
    # once it holds a key: rbee/config.py refuses a key others can read).
    config_mode = 0o640 if system else 0o600
    if where.config_file.exists():
        say("✅", f"Kept the existing config file {where.config_file}")
        mode = where.config_file.stat().st_mode & 0o777
        if mode & 0o007:
            os.chmod(where.config_file, mode & 0o770)
            say("🔒", f"{where.config_file} was readable by every user (mode {mode:03o}): now {mode & 0o770:03o}")
    else:
        fd = os.open(where.config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, config_mode)
        with os.fdopen(fd, "w") as out:
            out.write(DEFAULT_CONFIG.format(data=where.data))
        say("📝", f"Wrote the default config file {where.config_file}")
    if str(where.bin) not in os.environ.get("PATH", "").split(os.pathsep):
        say("👉", f"{where.bin} is not on your PATH: add it, e.g. export PATH=\"{where.bin}:$PATH\"")
    say("🎉", f"rbee installed ({'system' if system else 'user'}): programs in {where.bin}, config {where.config_file}, data {where.data}")
    return 0


def install(
    system: bool = typer.Option(False, "--system", help="System paths (/usr/local/bin, /etc/rbee/, /var/lib/rbee/), programs copied into a root-owned /usr/local/lib/rbee: needs root."),
    prefix: Path = typer.Option(None, "--prefix", metavar="DIR", help="Install under DIR instead (staging root for --system, HOME-like folder otherwise)."),
) -> None:
    """Put rbee's programs on PATH, create its folders and write a default config file (never overwriting one).

    User install: ~/.local/bin, ~/.config/rbee/config.toml, ~/.local/share/rbee/models/.
    Running it again is harmless. Shell completion: rbee-keeper --install-completion.

    Example: rbee-keeper install
    """

    async def go() -> int:
        from rbee.errors import RbeeError

        try:
            return do_install(system, prefix)
        except OSError as exc:
            raise RbeeError(
                "ACCESS_DENIED" if isinstance(exc, PermissionError) else "INSTALL_FAILED",
                f"Cannot install into {exc.filename or 'the target folder'}: {exc.strerror or exc}",
                {"path": str(exc.filename or "")},
                ["Run it as root for --system (sudo rbee-keeper install --system), or leave out --system"],
            ) from None

    run(go())


def register(app: typer.Typer) -> None:
    app.command("install")(install)
