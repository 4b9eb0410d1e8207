"""Git option injection on install: a node's branch or repository that git
could read as an option (`--upload-pack=CMD`) or a program (`ext::CMD`) is
refused with a stable code before anything runs, and the installer puts `--`
before git's positional arguments. The installer runs real git over the real
local transport."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rbee.errors import CODES, RbeeError
from rbee_queen.nodes.install import Installer
from rbee_queen.nodes.local import LocalTransport
from rbee_queen.nodes.store import NodeRecord
from rbee_queen.nodes.validation import check_git_ref, check_git_url

ASYNC = pytest.mark.asyncio(loop_scope="session")


@pytest.mark.parametrize("ref", ["main", "release/1.2", "v0.1.0", "feature_x+y", "a-b"])
def test_plain_branches_pass(ref: str) -> None:
    check_git_ref(ref)


@pytest.mark.parametrize(
    "ref",
    ["--upload-pack=touch /tmp/x;git-upload-pack", "-b", "", "a b", "a..b", "a//b", "a/", "a.lock", "x;touch y",
     "a\nb", "$(id)", "a~1", "a^", "a:b", "x" * 256, ".hidden", "a/.b"],
)  # fmt: skip
def test_refs_git_could_misread_are_refused(ref: str) -> None:
    with pytest.raises(RbeeError) as caught:
        check_git_ref(ref, "box")
    err = caught.value
    assert err.code == "INVALID_GIT_REF" and CODES[err.code].name == "INVALID_ARGUMENT"
    assert err.details["field"] == "git_branch"
    assert "rbee-keeper setup update-node --name box --git-branch main" in err.suggestions[0]


@pytest.mark.parametrize(
    "url",
    ["https://example.org/rbee.git", "ssh://git@example.org:2222/rbee.git", "git://example.org/rbee.git",
     "file:///srv/git/rbee.git", "/srv/git/rbee", "git@example.org:team/rbee.git", "example.org:rbee.git",
     "https://[::1]:8443/rbee.git"],
)  # fmt: skip
def test_allowed_repositories_pass(url: str) -> None:
    check_git_url(url)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("--upload-pack=touch", "'-'"),
        ("ext::sh -c touch% /tmp/x", "spaces"),
        ("ext::sh", "remote helpers"),
        ("fd::3", "remote helpers"),
        ("http://example.org/rbee.git", "use https"),
        ("ftp://example.org/rbee.git", "scheme 'ftp'"),
        ("ssh://-oProxyCommand=touch%20x/rbee", "host"),
        ("-oProxyCommand=x:rbee", "'-'"),
        ("file://host/rbee", "file:///path"),
        ("rbee", "relative"),
        ("https://example.org:99999/rbee", "port"),
    ],
)
def test_repositories_git_could_misuse_are_refused(url: str, says: str) -> None:
    with pytest.raises(RbeeError) as caught:
        check_git_url(url, "box")
    err = caught.value
    assert err.code == "INVALID_GIT_URL" and CODES[err.code].name == "INVALID_ARGUMENT"
    assert says in err.message, err.message
    assert "https://" in err.details["accepted"] and "--git-repo URL" in err.suggestions[0]


def git(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(["git", "-c", "user.email=t@rbee.invalid", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)  # fmt: skip


def tiny_repo(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "README").write_text("not rbee\n")
    git("init", "-q", "-b", "main", cwd=folder)
    git("add", "-A", cwd=folder)
    git("commit", "-q", "-m", "one", cwd=folder)
    return folder


async def install(record: NodeRecord) -> tuple[RbeeError, list[str]]:
    said: list[str] = []
    transport = LocalTransport(record.name)
    installer = Installer(transport, record, lambda emoji, message, *a, **k: said.append(message), step_timeout=60)
    with pytest.raises(RbeeError) as caught:
        await installer.run()
    return caught.value, said


@ASYNC
async def test_a_branch_that_is_an_option_runs_nothing_on_update(tmp_path: Path) -> None:
    """The attack: a checkout exists (a second install updates it), and the
    stored branch is `--upload-pack=touch MARKER;git-upload-pack` (a registry
    written before add-node checked branches)."""
    repo = tiny_repo(tmp_path / "repo")
    checkout = tmp_path / "node" / "rbee"
    git("clone", "-q", str(repo), str(checkout))
    marker = tmp_path / "MARKER"
    record = NodeRecord(name="box", transport="local", install_path=str(checkout), hive_key="k",
                        git_repo_url=str(repo), git_branch=f"--upload-pack=touch {marker};git-upload-pack")  # fmt: skip
    err, said = await install(record)
    assert not marker.exists()
    assert err.code == "INVALID_GIT_REF" and "starts with '-'" in err.message
    assert not any("Fetching" in line for line in said)


@ASYNC
async def test_a_remote_helper_runs_nothing_on_clone(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    record = NodeRecord(name="box", transport="local", install_path=str(tmp_path / "node" / "rbee"), hive_key="k",
                        git_repo_url=f"ext::sh -c touch% {marker}", git_branch="main")  # fmt: skip
    err, _ = await install(record)
    assert not marker.exists()
    assert err.code == "INVALID_GIT_URL"


@ASYNC
async def test_a_valid_source_is_cloned_and_updated_with_real_git(tmp_path: Path) -> None:
    """`--` before the positional arguments keeps clone and fetch working:
    both reach the next step (the project's setup script, which this tiny
    repository does not have)."""
    repo = tiny_repo(tmp_path / "repo")
    checkout = tmp_path / "node" / "rbee"
    record = NodeRecord(name="box", transport="local", install_path=str(checkout), hive_key="k",
                        git_repo_url=f"file://{repo}", git_branch="main")  # fmt: skip
    for _ in ("clone", "fetch"):
        err, said = await install(record)
        assert err.code == "INSTALL_FAILED" and err.details["step"].startswith("Setting up"), err
        assert any(line.startswith("Fetching") and "s)" in line for line in said), said
        assert (checkout / "README").is_file()
