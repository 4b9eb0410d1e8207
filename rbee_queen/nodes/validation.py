"""What a node registration may hold: one validator for add-node and
update-node alike (so update can never store what add refuses), and the git
source checks the installer repeats before it runs anything on a node (a
record of an older registry was stored without them).

Git sources (docs/security.md, "Commands on nodes"): the branch is a plain
ref name that git itself would accept and that cannot read as an option
(no leading '-'); the repository is an https://, ssh://, git:// or file://
URL, an scp-like ``user@host:path`` (ssh) or an absolute local path on the
node. Everything else, git's remote helpers (``ext::``, ``fd::``) and clear
http:// above all, is refused with INVALID_GIT_URL / INVALID_GIT_REF."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from rbee.errors import RbeeError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
GIT_URL_SCHEMES = ("https", "ssh", "git", "file")
# What git may speak while installing (GIT_ALLOW_PROTOCOL): the same list, so
# a submodule or a redirect cannot reach for a remote helper either.
GIT_ALLOW_PROTOCOL = ":".join(GIT_URL_SCHEMES)
MAX_GIT_URL = 2048
MAX_GIT_REF = 255

_REF = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/+-]*$")
_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$|^[0-9A-Fa-f]*:[0-9A-Fa-f:.]*$")
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_SCP = re.compile(r"^(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]*)@)?(?P<host>[^/:@]+):(?P<path>[^\x00-\x20]+)$")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def invalid(field: str, message: str, suggestion: str = "") -> RbeeError:
    return RbeeError("INVALID_ARGUMENT", message, {"field": field}, [suggestion] if suggestion else [])


def _bad_ref(ref: str, why: str, node: str) -> RbeeError:
    return RbeeError(
        "INVALID_GIT_REF",
        f"Invalid git branch {ref!r}: {why}",
        {"field": "git_branch", "branch": ref[:MAX_GIT_REF], "reason": why},
        [f"Name a branch such as main: `rbee-keeper setup update-node --name {node or 'NODE'} --git-branch main`"],
    )


def _bad_url(url: str, why: str, node: str) -> RbeeError:
    return RbeeError(
        "INVALID_GIT_URL",
        f"Invalid git repository {url[:200]!r}: {why}",
        {"field": "git_repo_url", "reason": why, "accepted": "https://, ssh://, git://, file://, user@host:path, /absolute/path"},
        [f"Use an https:// or ssh:// URL or an absolute path on the node: "
         f"`rbee-keeper setup update-node --name {node or 'NODE'} --git-repo URL`"],
    )  # fmt: skip


def check_git_ref(ref: str, node: str = "") -> None:
    """A branch git accepts (git check-ref-format's rules on a plain
    alphabet) that no git command can take for an option."""
    if not ref:
        raise _bad_ref(ref, "empty", node)
    if ref.startswith("-"):
        raise _bad_ref(ref, "it starts with '-', so git would read it as an option", node)
    if len(ref) > MAX_GIT_REF:
        raise _bad_ref(ref, f"longer than {MAX_GIT_REF} characters", node)
    if not _REF.match(ref):
        raise _bad_ref(ref, "use letters, digits and '.', '_', '/', '+', '-' (not first)", node)
    if ".." in ref or "//" in ref or ref.endswith(("/", ".", ".lock")) or "/." in ref or ref == "@":
        raise _bad_ref(ref, "git does not accept this ref name ('..', '//', '/.', or a trailing '/', '.' or '.lock')", node)


def check_git_url(url: str, node: str = "") -> None:
    """An https/ssh/git/file URL, an scp-like ssh address or an absolute path."""
    if len(url) > MAX_GIT_URL:
        raise _bad_url(url, f"longer than {MAX_GIT_URL} characters", node)
    if _CONTROL.search(url):
        raise _bad_url(url, "it holds spaces or control characters", node)
    if url.startswith("-"):
        raise _bad_url(url, "it starts with '-', so git would read it as an option", node)
    if url.startswith("/"):
        return
    if "::" in url.split("/", 1)[0]:
        raise _bad_url(url, "git remote helpers (TRANSPORT::ADDRESS) run programs: not allowed", node)
    if "://" in url:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in GIT_URL_SCHEMES:
            why = "clear-text http is not allowed: use https" if scheme == "http" else f"scheme {scheme!r} is not one of {', '.join(GIT_URL_SCHEMES)}"
            raise _bad_url(url, why, node)
        if scheme == "file":
            if parts.netloc or not parts.path.startswith("/"):
                raise _bad_url(url, "a file:// URL names an absolute path on the node (file:///path)", node)
            return
        try:
            parts.port
        except ValueError:
            raise _bad_url(url, "its port is not a number from 1 to 65535", node) from None
        if not _HOST.match(parts.hostname or "") or (parts.username is not None and not _USER.match(parts.username)):
            raise _bad_url(url, "no valid host (or user) in it", node)
        return
    scp = _SCP.match(url)
    if scp and _HOST.match(scp.group("host")):
        return
    raise _bad_url(url, "not a URL git can use here (relative paths are not allowed: the node has no working folder for them)", node)


def check_git_source(url: str, ref: str, node: str = "") -> None:
    if url:
        check_git_url(url, node)
    check_git_ref(ref, node)


def check_node_fields(values: dict[str, object], local: bool) -> None:
    """The fields of a registration as they would be stored (add-node's
    request after its defaults, or a node merged with update-node's changes)."""
    name = str(values.get("name", ""))
    if not values.get("install_path"):
        raise invalid("install_path", "A node needs --install-path (where rbee is installed on it)")
    for field in ("install_path", "rbee_home"):
        value = str(values.get(field) or "")
        if value and not value.startswith("/"):
            raise invalid(field, f"--{field.replace('_', '-')} must be absolute on the node: {value}")
        if _CONTROL.search(value.replace(" ", "")):
            raise invalid(field, f"--{field.replace('_', '-')} holds control characters")
    for field, option in (("hive_port", "Hive port"), ("ssh_port", "SSH port")):
        if field == "ssh_port" and local:
            continue
        port = values.get(field)
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise invalid(field, f"{option} {port} is outside 1-65535")
    if not local:
        for field, option in (("ssh_host", "--ssh-host"), ("ssh_user", "--ssh-user"), ("ssh_key_path", "--ssh-key")):
            if not str(values.get(field) or "").strip():
                raise invalid(field, f"An SSH node needs {option}", "Or register this machine with --local")
        host = str(values.get("ssh_host") or "")
        if host.startswith("-") or _CONTROL.search(host):
            raise invalid("ssh_host", f"Invalid SSH host {host!r}")
        user = str(values.get("ssh_user") or "")
        if user.startswith("-") or _CONTROL.search(user):
            raise invalid("ssh_user", f"Invalid SSH user {user!r}")
    check_git_source(str(values.get("git_repo_url") or ""), str(values.get("git_branch") or "main"), name)
