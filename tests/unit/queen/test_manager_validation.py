"""NodeManager refuses a bad AddNodeRequest / UpdateNodeRequest before it
reaches for any node: INVALID_ARGUMENT naming the field, SSH_KEY_NOT_FOUND for
a key file that is not there, NODE_EXISTS for a taken name. Nothing is saved
and no connection is narrated."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from rbee.errors import CODES, RbeeError
from rbee.narration import Narrator
from rbee.v1 import nodes_pb2
from rbee_queen.nodes.manager import NodeManager
from rbee_queen.nodes.relay import ACTOR, NodeEventRelay
from rbee_queen.nodes.store import NodeRecord, NodeStore
from rbee_queen.settings import QueenSettings

pytestmark = pytest.mark.asyncio(loop_scope="session")


class World:
    def __init__(self, tmp: Path) -> None:
        self.log = io.StringIO()
        self.narrator = Narrator(ACTOR, stream=self.log)
        self.store = NodeStore(tmp / "beehives.db")
        self.manager = NodeManager(QueenSettings(home=tmp), self.store, self.narrator)
        self.key = tmp / "id_ed25519"
        self.key.write_text("not really a key\n")

    def request(self, **fields) -> nodes_pb2.AddNodeRequest:
        values = dict(name="box", ssh_host="192.0.2.10", ssh_port=22, ssh_user="me", ssh_key_path=str(self.key),
                      install_path="/opt/rbee")  # fmt: skip
        values.update(fields)
        return nodes_pb2.AddNodeRequest(**values)

    async def add(self, **fields) -> RbeeError:
        with pytest.raises(RbeeError) as caught:
            await self.manager.add(self.request(**fields), NodeEventRelay(self.narrator))
        return caught.value


@pytest.fixture
def world(tmp_path: Path):
    w = World(tmp_path)
    yield w
    w.store.close()


def nothing_happened(world: World) -> None:
    assert world.store.list() == []
    assert "Testing the connection" not in world.log.getvalue()
    assert "Connecting" not in world.log.getvalue()


@pytest.mark.parametrize("name", ["", "bad name", "-leading-dash", "a/b", "x" * 65, "dots..ok?"])
async def test_a_bad_name_is_invalid_argument_naming_the_field(world: World, name: str) -> None:
    err = await world.add(name=name)
    assert err.code == "INVALID_ARGUMENT" and err.details["field"] == "name"
    assert repr(name) in err.message
    assert CODES[err.code].name == "INVALID_ARGUMENT"
    nothing_happened(world)


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"install_path": ""}, "install_path", "--install-path"),
        ({"install_path": "rbee"}, "install_path", "must be absolute on the node: rbee"),
        ({"install_path": "~/rbee"}, "install_path", "must be absolute"),
        ({"rbee_home": "relative/home"}, "rbee_home", "--rbee-home must be absolute"),
        ({"ssh_host": ""}, "ssh_host", "--ssh-host"),
        ({"ssh_host": "   "}, "ssh_host", "--ssh-host"),
        ({"ssh_user": ""}, "ssh_user", "--ssh-user"),
        # The keeper's option (a request without --ssh-key arrives with an empty path).
        ({"ssh_key_path": ""}, "ssh_key_path", "needs --ssh-key"),
        ({"ssh_port": 70000}, "ssh_port", "70000"),
        ({"hive_port": 70000}, "hive_port", "70000"),
    ],
)
async def test_a_bad_field_is_invalid_argument_naming_it(world: World, fields: dict, field: str, says: str) -> None:
    err = await world.add(**fields)
    assert err.code == "INVALID_ARGUMENT", err
    assert err.details["field"] == field and says in err.message, err
    nothing_happened(world)


async def test_missing_ssh_fields_suggest_a_local_node(world: World) -> None:
    err = await world.add(ssh_user="")
    assert any("--local" in s for s in err.suggestions)


async def test_a_key_file_that_is_not_there_is_refused_before_connecting(world: World, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-key"
    err = await world.add(ssh_key_path=str(missing))
    assert err.code == "SSH_KEY_NOT_FOUND" and err.message == f"SSH key not found: {missing}"
    nothing_happened(world)


async def test_a_taken_name_is_refused_before_connecting(world: World) -> None:
    world.store.add(NodeRecord(name="box", transport="ssh", install_path="/opt/first", hive_key="k"))
    err = await world.add(install_path="/opt/second")
    assert err.code == "NODE_EXISTS"
    assert world.store.get("box").install_path == "/opt/first"
    assert "Testing the connection" not in world.log.getvalue()


async def update(world: World, **fields) -> RbeeError:
    with pytest.raises(RbeeError) as caught:
        await world.manager.update(nodes_pb2.UpdateNodeRequest(**fields), NodeEventRelay(world.narrator))
    return caught.value


async def test_update_refuses_bad_values_before_connecting(world: World) -> None:
    world.store.add(NodeRecord(name="box", transport="ssh", install_path="/opt/rbee", hive_key="k", ssh_host="192.0.2.10",
                               ssh_user="me", ssh_key_path=str(world.key)))  # fmt: skip
    world.store.add(NodeRecord(name="here", transport="local", install_path="/opt/here", hive_key="k"))

    err = await update(world, name="box")
    assert err.code == "INVALID_ARGUMENT" and err.details["field"] == "fields"
    err = await update(world, name="box", install_path="relative")
    assert err.code == "INVALID_ARGUMENT" and err.details["field"] == "install_path"
    err = await update(world, name="here", ssh_host="192.0.2.11")
    assert err.code == "INVALID_ARGUMENT" and "local" in err.message
    assert any("rbee-keeper setup remove-node --name here" in s for s in err.suggestions)
    err = await update(world, name="box", ssh_key_path=str(world.key) + ".gone")
    assert err.code == "SSH_KEY_NOT_FOUND"
    err = await update(world, name="ghost", hive_port=7901)
    assert err.code == "NODE_NOT_FOUND"

    assert "Testing the new connection" not in world.log.getvalue()
    assert world.store.get("box").install_path == "/opt/rbee"


@pytest.mark.parametrize(
    "fields, tls",
    [
        (dict(ssh_host="192.0.2.10"), True),  # beyond loopback: TLS by default
        (dict(ssh_host="box.example"), True),
        (dict(ssh_host="127.0.0.1"), False),  # stays on this machine
        (dict(ssh_host="localhost"), False),
        (dict(ssh_host="192.0.2.10", tls=False), False),  # --no-tls
        (dict(ssh_host="127.0.0.1", tls=True), True),  # --tls
    ],
)
async def test_tls_is_on_by_default_for_nodes_beyond_loopback(tmp_path: Path, fields: dict, tls: bool) -> None:
    world = World(tmp_path)
    record = world.manager._record_from(world.request(**fields))
    assert record.tls is tls
    local = world.manager._record_from(world.request(local=True, ssh_host=""))
    assert local.tls is False


def saved_box(world: World) -> None:
    world.store.add(NodeRecord(name="box", transport="ssh", install_path="/opt/rbee", hive_key="k", ssh_host="192.0.2.10",
                               ssh_user="me", ssh_key_path=str(world.key), hive_port=7900))  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        (dict(hive_port=0), "INVALID_ARGUMENT", "hive_port"),  # add-node takes 0 for "the default"; a stored 0 is no port
        (dict(hive_port=70000), "INVALID_ARGUMENT", "hive_port"),
        (dict(ssh_port=0), "INVALID_ARGUMENT", "ssh_port"),
        (dict(git_branch="--upload-pack=touch /tmp/x;git-upload-pack"), "INVALID_GIT_REF", "git_branch"),
        (dict(git_repo_url="ext::sh -c touch% /tmp/x"), "INVALID_GIT_URL", "git_repo_url"),
        (dict(git_repo_url="--upload-pack=x"), "INVALID_GIT_URL", "git_repo_url"),
        (dict(ssh_host="-oProxyCommand=x"), "INVALID_ARGUMENT", "ssh_host"),
        (dict(ssh_host=""), "INVALID_ARGUMENT", "ssh_host"),
        (dict(ssh_user=""), "INVALID_ARGUMENT", "ssh_user"),
        (dict(install_path=""), "INVALID_ARGUMENT", "install_path"),
    ],
)
async def test_update_refuses_what_add_refuses(world: World, fields: dict, code: str, field: str) -> None:
    """One validator for both: update-node cannot store what add-node refuses."""
    saved_box(world)
    err = await update(world, name="box", **fields)
    assert err.code == code and err.details["field"] == field, err
    stored = world.store.get("box")
    assert (stored.hive_port, stored.ssh_port, stored.git_branch, stored.git_repo_url, stored.ssh_host) == (7900, 22, "main", "", "192.0.2.10")
    assert "Testing the new connection" not in world.log.getvalue()
    if fields != dict(hive_port=0) and fields != dict(ssh_port=0):  # on add, 0 means the default port
        err = await world.add(**fields)
        assert err.code == code and err.details["field"] == field, err


@pytest.mark.parametrize("fields", [dict(git_branch="--upload-pack=x"), dict(git_repo_url="http://example.org/rbee.git")])
async def test_add_refuses_git_sources_git_could_misuse(world: World, fields: dict) -> None:
    err = await world.add(**fields)
    assert err.code in ("INVALID_GIT_REF", "INVALID_GIT_URL")
    nothing_happened(world)
