"""`rbee-keeper setup add-node|update-node|remove-node|list-nodes|install|check-node`
(and join|enrol-token, rbee_keeper/commands/join.py):
the queen's node registry (S3) and what the queen does on nodes, reached with
--queen HOST:PORT (default: the queen on this machine)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from rbee.backends import backend_name
from rbee.enum_words import TRANSPORTS
from rbee.errors import RbeeError
from rbee.narration import format_line
from rbee.v1 import nodes_pb2

from rbee_keeper.common import QUEEN_OPTION, resolve_queen, run
from rbee_keeper.listing import show_listing
from rbee_keeper.queen_client import QueenClient
from rbee_keeper.render import local_time, narrator

setup_app = typer.Typer(
    help="Nodes of the cluster: register them with the queen, install rbee on them, check them.", no_args_is_help=True
)

QUEEN_KEY_OPTION = typer.Option(
    None, "--api-key", metavar="KEY",
    help="The queen's key (or RBEE_QUEEN_API_KEY, \\[keeper] queen_api_key, or $RBEE_HOME/queen.key written by a local queen).",
)  # fmt: skip
NAME_OPTION = typer.Option(..., "--name", metavar="NAME", help="The node's name.")
STATUS = {v: k.removeprefix("NODE_STATUS_").lower() for k, v in nodes_pb2.NodeStatus.items()}


def _node_dict(n: nodes_pb2.Node) -> dict:
    return {
        "name": n.name,
        "connection": TRANSPORTS.word(n.connection),
        "ssh_host": n.ssh_host,
        "ssh_port": n.ssh_port,
        "ssh_user": n.ssh_user,
        "ssh_key_path": n.ssh_key_path,
        "git_repo_url": n.git_repo_url,
        "git_branch": n.git_branch,
        "install_path": n.install_path,
        "rbee_home": n.rbee_home,
        "hive_port": n.hive_port,
        "status": STATUS.get(n.status, "unknown"),
        "last_connected_unix_ms": n.last_connected_unix_ms,
        "last_error": n.last_error,
        "backends": {backend_name(b.name): b.device_count for b in n.backends},
        "hive_version": n.hive_version,
        "hive_running": n.hive_running,
        "tls": n.tls,
        "hive_started_by_queen": n.hive_started_by_queen,
    }


def _host(n: nodes_pb2.Node) -> str:
    return "(this machine)" if TRANSPORTS.word(n.connection) == "local" else f"{n.ssh_user}@{n.ssh_host}:{n.ssh_port}"


async def _follow(events, as_json: bool = False) -> nodes_pb2.Node:
    """Print a node operation's events on stderr; return its node."""
    say = narrator()
    node = None
    async for item in events:
        kind = item.WhichOneof("kind")
        if kind == "event" and item.event.HasField("narration"):
            say.emit(item.event.narration)
        elif kind == "check":
            c = item.check
            emoji = "⚠️" if c.warning else ("✅" if c.passed else "❌")
            say(emoji, c.message, actor="queen-rbee")
        elif kind == "node":
            node = item.node
    if node is None:
        raise RbeeError("STREAM_BROKEN", "The queen ended the operation without a result")
    if as_json:
        print(json.dumps(_node_dict(node)))
    return node


def _check_key_file(key: Path | None) -> str:
    """S3: the keeper checks the key file before anything is sent."""
    if key is None:
        return ""
    path = key.expanduser()
    if not path.is_file():
        raise RbeeError(
            "SSH_KEY_NOT_FOUND",
            f"SSH key not found: {key}",
            {"path": str(key)},
            ["Pass the private key the node accepts with --ssh-key PATH (e.g. ~/.ssh/id_ed25519)"],
        )
    return str(path.resolve())


@setup_app.command("add-node")
def add_node_cmd(
    name: str = NAME_OPTION,
    ssh_host: str = typer.Option("", "--ssh-host", metavar="HOST", help="Host name or address of the node."),
    ssh_port: int = typer.Option(22, "--ssh-port", min=1, max=65535, help="SSH port of the node."),
    ssh_user: str = typer.Option("", "--ssh-user", metavar="USER", help="User to log in as."),
    ssh_key: Path = typer.Option(None, "--ssh-key", metavar="PATH", help="Private key the node accepts (key auth only)."),
    git_repo: str = typer.Option("", "--git-repo", metavar="URL", help="Repository `setup install` clones onto the node."),
    git_branch: str = typer.Option("main", "--git-branch", metavar="BRANCH", help="Branch to install."),
    install_path: str = typer.Option("", "--install-path", metavar="PATH", help="Where rbee lives on the node (absolute)."),
    rbee_home: str = typer.Option("", "--rbee-home", metavar="PATH", help="RBEE_HOME of the node's hive (default ~/.rbee there)."),
    hive_port: int = typer.Option(7900, "--hive-port", min=1, max=65535, help="Port of the node's hive."),
    local: bool = typer.Option(False, "--local", help="The node is this machine: no SSH (install path defaults to this installation)."),
    trust_host_key: bool = typer.Option(
        False, "--trust-host-key", help="Accept and record the node's SSH host key if none is recorded yet (check its fingerprint first)."
    ),
    tls: bool = typer.Option(
        None, "--tls/--no-tls",
        help="Mutual TLS for the node's hive and workers, with certificates the queen's CA issues and writes to the "
        "node over SSH (default: on when the node's address is not loopback). --no-tls on such a node sends keys in clear.",
    ),  # fmt: skip
    as_json: bool = typer.Option(False, "--json", help="Print the saved node as JSON on stdout."),
    queen: str = QUEEN_OPTION,
    api_key: str = QUEEN_KEY_OPTION,
) -> None:
    """Register a node: the queen tests the connection (SSH, host key verified), detects
    the node's backends and saves it only when all of that worked.

    Example: rbee-keeper setup add-node --name workstation --ssh-host 192.0.2.10 --ssh-user me
    --ssh-key ~/.ssh/id_ed25519 --git-repo https://example.org/rbee.git --install-path /home/me/rbee
    """

    async def go() -> int:
        key_path = "" if local else _check_key_file(ssh_key)
        request = nodes_pb2.AddNodeRequest(
            name=name, ssh_host=ssh_host, ssh_port=ssh_port, ssh_user=ssh_user, ssh_key_path=key_path,
            git_repo_url=git_repo, git_branch=git_branch, install_path=install_path, rbee_home=rbee_home,
            hive_port=hive_port, local=local, trust_host_key=trust_host_key, tls=tls,
        )  # fmt: skip
        async with QueenClient.connect(resolve_queen(queen), api_key) as client:
            node = await _follow(client.add_node(request), as_json)
        if not node.hive_version:
            narrator()("👉", f"Next: rbee-keeper setup install --node {node.name}")
        return 0

    run(go())


@setup_app.command("update-node")
def update_node_cmd(
    name: str = NAME_OPTION,
    ssh_host: str = typer.Option(None, "--ssh-host", metavar="HOST"),
    ssh_port: int = typer.Option(None, "--ssh-port", min=1, max=65535),
    ssh_user: str = typer.Option(None, "--ssh-user", metavar="USER"),
    ssh_key: Path = typer.Option(None, "--ssh-key", metavar="PATH"),
    git_repo: str = typer.Option(None, "--git-repo", metavar="URL"),
    git_branch: str = typer.Option(None, "--git-branch", metavar="BRANCH"),
    install_path: str = typer.Option(None, "--install-path", metavar="PATH"),
    rbee_home: str = typer.Option(None, "--rbee-home", metavar="PATH"),
    hive_port: int = typer.Option(None, "--hive-port", min=1, max=65535),
    trust_host_key: bool = typer.Option(False, "--trust-host-key", help="Accept and record the host key if none is recorded."),
    tls: bool = typer.Option(None, "--tls/--no-tls", help="Turn mutual TLS for the node's hive and workers on or off (from the hive's next start)."),
    as_json: bool = typer.Option(False, "--json", help="Print the node as JSON on stdout."),
    queen: str = QUEEN_OPTION,
    api_key: str = QUEEN_KEY_OPTION,
) -> None:
    """Change a node's settings; a changed SSH connection is tested before it is saved.

    Example: rbee-keeper setup update-node --name workstation --ssh-port 2222
    """

    async def go() -> int:
        fields = dict(ssh_host=ssh_host, ssh_port=ssh_port, ssh_user=ssh_user, git_repo_url=git_repo,
                      git_branch=git_branch, install_path=install_path, rbee_home=rbee_home, hive_port=hive_port, tls=tls)  # fmt: skip
        if ssh_key is not None:
            fields["ssh_key_path"] = _check_key_file(ssh_key)
        request = nodes_pb2.UpdateNodeRequest(name=name, trust_host_key=trust_host_key, **{k: v for k, v in fields.items() if v is not None})
        async with QueenClient.connect(resolve_queen(queen), api_key) as client:
            await _follow(client.update_node(request), as_json)
        return 0

    run(go())


@setup_app.command("remove-node")
def remove_node_cmd(
    name: str = NAME_OPTION,
    queen: str = QUEEN_OPTION,
    api_key: str = QUEEN_KEY_OPTION,
) -> None:
    """Forget a node. Its hive is stopped only if this queen started it; nothing else is touched.

    Example: rbee-keeper setup remove-node --name workstation
    """

    async def go() -> int:
        async with QueenClient.connect(resolve_queen(queen), api_key) as client:
            reply = await client.remove_node(name)
        say = narrator()
        say("🗑️", f"Node {name} removed from the queen's registry")
        say("🛑" if reply.hive_stopped else "ℹ️", reply.message)
        return 0

    run(go())


@setup_app.command("list-nodes")
def list_nodes_cmd(
    as_json: bool = typer.Option(False, "--json", help="One JSON object per node."),
    queen: str = QUEEN_OPTION,
    api_key: str = QUEEN_KEY_OPTION,
) -> None:
    """The registered nodes: name, host, status, last connected, install path, backends, hive.

    Example: rbee-keeper setup list-nodes --json
    """

    async def go() -> int:
        async with QueenClient.connect(resolve_queen(queen), api_key) as client:
            nodes = await client.list_nodes()
        return show_listing(
            nodes, as_json, _node_dict, "No nodes registered: add one with `rbee-keeper setup add-node --name NAME ...`",
            ("NAME", "HOST", "STATUS", "LAST CONNECTED", "INSTALL PATH", "BACKENDS", "HIVE"),
            lambda n: (n.name, _host(n), STATUS.get(n.status, "unknown"), local_time(n.last_connected_unix_ms, seconds=True, unset="never"), n.install_path,
                       ", ".join(f"{backend_name(b.name)}×{b.device_count}" for b in n.backends) or "-",
                       (f"up :{n.hive_port}" if n.hive_running else f"down :{n.hive_port}")
                       + (f" ({n.hive_version})" if n.hive_version else "") + (" TLS" if n.tls else "")),
        )  # fmt: skip

    run(go())


@setup_app.command("install")
def install_cmd(
    node: str = typer.Option(..., "--node", metavar="NAME", help="The registered node to install rbee on."),
    as_json: bool = typer.Option(False, "--json", help="Print the node as JSON on stdout afterwards."),
    queen: str = QUEEN_OPTION,
    api_key: str = QUEEN_KEY_OPTION,
) -> None:
    """Install or update rbee on a node at its install path: clone or update the repository,
    set up its Python environment and engine, verify the hive program. Each step is narrated
    with its duration; running it again updates in place.

    Example: rbee-keeper setup install --node workstation
    """

    async def go() -> int:
        async with QueenClient.connect(resolve_queen(queen), api_key) as client:
            await _follow(client.install_node(node), as_json)
        narrator()("👉", f"Next: rbee-keeper setup check-node --name {node}")
        return 0

    run(go())


@setup_app.command("check-node")
def check_node_cmd(
    name: str = NAME_OPTION,
    ssh_only: bool = typer.Option(False, "--ssh-only", help="Only the SSH preflight: do not start or check the hive."),
    as_json: bool = typer.Option(False, "--json", help="Print the node as JSON on stdout afterwards."),
    queen: str = QUEEN_OPTION,
    api_key: str = QUEEN_KEY_OPTION,
) -> None:
    """Preflight a node: SSH (reachable, authenticated, `echo test`, latency, hive program), then
    its hive (started when it does not answer): health, version, backends, resources.

    Example: rbee-keeper setup check-node --name workstation
    """

    async def go() -> int:
        async with QueenClient.connect(resolve_queen(queen), api_key) as client:
            await _follow(client.check_node(name, ssh_only), as_json)
        return 0

    run(go())


def register(app: typer.Typer) -> None:
    from rbee_keeper.commands import join  # noqa: F401 - `setup join` and `setup enrol-token`

    app.add_typer(setup_app, name="setup")
