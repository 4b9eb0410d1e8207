"""The config file's [remote] section (S11): repo_dir is where rbee lives on
nodes registered without --install-path; a bad section is INVALID_CONFIG
naming the file and the key, before anything is saved."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from rbee.errors import RbeeError
from rbee.narration import Narrator
from rbee.v1 import nodes_pb2
from rbee_queen.nodes.manager import NodeManager
from rbee_queen.nodes.relay import ACTOR
from rbee_queen.nodes.store import NodeStore
from rbee_queen.settings import QueenSettings


@pytest.fixture
def manager(tmp_path: Path):
    store = NodeStore(tmp_path / "beehives.db")
    yield NodeManager(QueenSettings(home=tmp_path), store, Narrator(ACTOR, stream=io.StringIO()))
    store.close()


def request(**fields) -> nodes_pb2.AddNodeRequest:
    values = dict(name="box", ssh_host="192.0.2.10", ssh_user="me", ssh_key_path="/k")
    values.update(fields)
    return nodes_pb2.AddNodeRequest(**values)


def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    monkeypatch.setenv("RBEE_CONFIG", str(path))
    return path


def test_repo_dir_is_the_install_path_of_a_node_registered_without_one(manager, tmp_path, monkeypatch) -> None:
    config(tmp_path, monkeypatch, '[remote]\nrepo_dir = "/srv/rbee"\nhive_program = "/srv/rbee/.venv/bin/rbee-hive"\n')
    assert manager._record_from(request()).install_path == "/srv/rbee"
    assert manager._record_from(request(install_path="/opt/mine")).install_path == "/opt/mine"


def test_without_either_the_error_names_both_ways(manager, tmp_path, monkeypatch) -> None:
    config(tmp_path, monkeypatch, "[keeper]\n")
    with pytest.raises(RbeeError) as caught:
        manager._record_from(request())
    assert caught.value.code == "INVALID_ARGUMENT" and "--install-path" in caught.value.message
    assert any("[remote]" in s for s in caught.value.suggestions)


def test_a_bad_remote_section_names_the_file_and_the_key(manager, tmp_path, monkeypatch) -> None:
    path = config(tmp_path, monkeypatch, '[remote]\nrepo_dir = "srv/rbee"\n')
    with pytest.raises(RbeeError) as caught:
        manager._record_from(request())
    assert caught.value.code == "INVALID_CONFIG"
    assert str(path) in caught.value.message and "[remote] repo_dir" in caught.value.message


def test_hive_program_is_the_program_ssh_nodes_run_and_local_nodes_ignore(tmp_path) -> None:
    from rbee_queen.nodes.store import NodeRecord

    store = NodeStore(tmp_path / "remote.db", hive_program="/srv/rbee/bin/rbee-hive")
    try:
        store.add(NodeRecord(name="box", transport="ssh", install_path="/opt/rbee", hive_key="k", ssh_host="192.0.2.10"))
        store.add(NodeRecord(name="here", transport="local", install_path="/opt/local-rbee", hive_key="k"))
        assert store.get("box").hive_program == "/srv/rbee/bin/rbee-hive"
        assert store.get("here").hive_program == "/opt/local-rbee/.venv/bin/rbee-hive"
        assert {n.name: n.hive_program for n in store.list()}["box"] == "/srv/rbee/bin/rbee-hive"
    finally:
        store.close()
    plain = NodeStore(tmp_path / "remote.db")
    try:
        assert plain.get("box").hive_program == "/opt/rbee/.venv/bin/rbee-hive"
    finally:
        plain.close()


def test_the_design_names_of_the_remote_keys_are_aliases(manager, tmp_path, monkeypatch) -> None:
    config(tmp_path, monkeypatch, '[remote]\ngit_repo_dir = "/srv/rbee"\nbinary_path = "/srv/rbee/.venv/bin/rbee-hive"\n')
    from rbee.config import remote_settings

    settings = remote_settings()
    assert settings.repo_dir == "/srv/rbee" and settings.hive_program == "/srv/rbee/.venv/bin/rbee-hive"
    assert manager._record_from(request()).install_path == "/srv/rbee"


def test_an_alias_that_disagrees_with_its_key_is_refused(manager, tmp_path, monkeypatch) -> None:
    path = config(tmp_path, monkeypatch, '[remote]\nrepo_dir = "/srv/a"\ngit_repo_dir = "/srv/b"\n')
    with pytest.raises(RbeeError) as caught:
        manager._record_from(request())
    assert caught.value.code == "INVALID_CONFIG"
    assert str(path) in caught.value.message and "git_repo_dir" in caught.value.message


def test_an_alias_is_checked_like_its_key(manager, tmp_path, monkeypatch) -> None:
    config(tmp_path, monkeypatch, '[remote]\nbinary_path = "bin/rbee-hive"\n')
    with pytest.raises(RbeeError) as caught:
        manager._record_from(request())
    assert caught.value.code == "INVALID_CONFIG" and "binary_path" in caught.value.message
