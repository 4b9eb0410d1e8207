"""Steps for queen_nodes.feature (S3, S4.2 queen side) and
queen_ssh_preflight.feature (S4.1): a real queen-rbee process, the keeper's
console script, nodes on 127.0.0.1 (asyncssh's server from tests/fixtures/ssh.py,
or OpenSSH's sshd). rbee is installed twice in the whole run: once by a
scenario through the queen, once for the module's "rbee installed" nodes."""

from __future__ import annotations

import asyncio
import json
import re
import stat
import time
from pathlib import Path

import psutil
import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from features.steps.queen_support import QueenWorld, install_rbee, quoted
from tests.fixtures.queen import node_hive_pids

scenarios("queen_nodes.feature", "queen_ssh_preflight.feature")


@pytest.fixture(scope="module")
async def session_loop() -> asyncio.AbstractEventLoop:
    """The loop the session's async fixtures (the asyncssh server) run on."""
    return asyncio.get_running_loop()


@pytest.fixture(scope="module")
def installed_rbee(session_loop, repo_snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An install path with rbee installed, shared by the scenarios of this
    module (each gives its node its own RBEE_HOME and hive port, so nothing
    a hive writes is shared)."""
    dest = tmp_path_factory.mktemp("installed-node") / "rbee"
    install_rbee(session_loop, repo_snapshot, dest)
    return dest


@pytest.fixture
def world(session_loop, queen_factory, repo_snapshot: Path, tmp_path: Path):
    state = QueenWorld(session_loop, tmp_path, queen_factory, repo_snapshot)
    yield state
    state.close()


def _last(world: QueenWorld):
    assert world.last is not None, "no keeper command was run"
    return world.last


# -- the queen and the nodes ----------------------------------------------------------------


@given("a running queen")
def _queen(world):
    world.start_queen()


@given(parsers.parse("a running queen that warns about SSH latency above {limit}"))
def _queen_latency(world, limit):
    world.start_queen(RBEE_QUEEN_LATENCY_WARNING=limit)


def _use_node(world: QueenWorld, node, known: bool, installed: Path | None = None) -> None:
    world.node = node
    world.install_path = installed
    if known:
        node.write_known_hosts(world.known_hosts)


@given("an SSH node whose host key the queen knows")
def _node_known(world, asyncssh_node):
    _use_node(world, asyncssh_node, known=True)


@given("an SSH node whose host key the queen does not know")
def _node_unknown(world, asyncssh_node):
    _use_node(world, asyncssh_node, known=False)


@given("an SSH node where rbee is installed, whose host key the queen knows")
def _node_installed(world, asyncssh_node, installed_rbee):
    _use_node(world, asyncssh_node, known=True, installed=installed_rbee)


@given("OpenSSH's sshd on 127.0.0.1 where rbee is installed, whose host key the queen knows")
def _sshd_installed(world, sshd_node, installed_rbee):
    _use_node(world, sshd_node, known=True, installed=installed_rbee)


@given("a TCP listener on 127.0.0.1 that never speaks SSH")
def _silent(world, asyncssh_node):
    _use_node(world, asyncssh_node, known=True)
    world.port = world.silent_listener()


@given("a port on 127.0.0.1 where nothing listens")
def _closed(world, asyncssh_node):
    _use_node(world, asyncssh_node, known=True)
    world.port = world.closed_port()


@given(parsers.parse('the node "{name}" is registered with install path "{path}"'))
def _registered(world, name, path):
    run = world.keeper(*world.add_args(name, install_path=path))
    assert run.code == 0, run


@given(parsers.parse('the node "{name}" is registered with rbee installed'))
def _registered_installed(world, name):
    assert world.install_path is not None
    run = world.keeper(*world.add_args(name))
    assert run.code == 0, run
    assert f"Detected on {name}: cpu" in run.err, run


@given(parsers.parse('the node "{name}" is registered with rbee installed and TLS'))
def _registered_tls(world, name):
    assert world.install_path is not None
    run = world.keeper(*world.add_args(name), "--tls")
    assert run.code == 0, run
    assert f"Issued {name}'s hive certificate" in run.err, run


@when("the node starts presenting another host key")
def _rekey(world):
    world.known_hosts_before = world.known_hosts.read_text()
    world.old_fingerprint = world.node.host_key_fingerprint
    world.run(world.node.change_host_key())


@when("the node's SSH server stops")
def _ssh_stops(world):
    world.run(world.node.stop())


@when("the node stops accepting the queen's key")
def _key_revoked(world):
    # The asyncssh server authorizes whatever key its `client_key` is.
    world.node.keys.client_key = world.node.keys.wrong_key


# -- keeper commands ------------------------------------------------------------------------


@when(parsers.parse('I add the node "{name}" with the keeper'))
def _add(world, name):
    world.keeper(*world.add_args(name))


@when(parsers.parse('I add the node "{name}" with the keeper, trusting its host key'))
def _add_trusting(world, name):
    world.keeper(*world.add_args(name), "--trust-host-key")


@when(parsers.parse('I add the node "{name}" with a key file that does not exist'))
def _add_missing_key(world, name):
    world.missing_key = world.tmp / "no-such-key"
    world.keeper(*world.add_args(name, key=world.missing_key))


@when(parsers.re(r'I add the node "(?P<name>[^"]+)" at (the listener\'s|that) port'))
def _add_at_port(world, name):
    world.keeper(*world.add_args(name, port=world.port))


@when(parsers.parse('I add the node "{name}" with a key the node does not accept'))
def _add_wrong_key(world, name):
    world.keeper(*world.add_args(name, key=world.node.wrong_key_path))


@when(parsers.parse('I add the node "{name}" again with install path "{path}"'))
def _add_again(world, name, path):
    world.keeper(*world.add_args(name, install_path=path))


@when(parsers.parse('I install rbee on node "{name}"'))
def _install(world, name):
    world.keeper("setup", "install", "--node", name)


@when("I list the nodes")
def _list(world):
    world.keeper("setup", "list-nodes")


@when("I list the nodes as JSON")
def _list_json(world):
    world.keeper("setup", "list-nodes", "--json")


@when(parsers.parse('I update node "{name}" with --git-branch "{branch}"'))
def _update_branch(world, name, branch):
    world.keeper("setup", "update-node", "--name", name, "--git-branch", branch)


@when(parsers.parse('I update node "{name}" to an SSH port where nothing listens'))
def _update_closed(world, name):
    world.keeper("setup", "update-node", "--name", name, "--ssh-port", str(world.closed_port()))


@when(parsers.parse('I update node "{name}" with its SSH port, trusting its host key'))
def _update_trusting(world, name):
    world.keeper("setup", "update-node", "--name", name, "--ssh-port", str(world.node.port), "--trust-host-key")


@when(parsers.parse('I remove node "{name}"'))
def _remove(world, name):
    world.keeper("setup", "remove-node", "--name", name)


@when(parsers.parse('I run install, check-node, update-node and remove-node for the unknown node "{name}"'))
def _unknown(world, name):
    world.runs = world.keepers(
        ["setup", "install", "--node", name],
        ["setup", "check-node", "--name", name],
        ["setup", "update-node", "--name", name, "--hive-port", "7901"],
        ["setup", "remove-node", "--name", name],
    )


@when(parsers.parse('I check node "{name}" over SSH only'))
def _check_ssh(world, name):
    world.keeper("setup", "check-node", "--name", name, "--ssh-only")


@when(parsers.parse('I check node "{name}"'))
def _check(world, name):
    world.keeper("setup", "check-node", "--name", name)


# -- outcomes -------------------------------------------------------------------------------


@then(parsers.parse("the keeper exits {code:d}"))
def _exits(world, code):
    run = _last(world)
    assert run.code == code, run
    assert "Traceback" not in run.err, run


@then(parsers.re(r'the keeper refuses with (?P<code>[A-Z_]+) and the message "(?P<text>[^"]*)"(?P<path> followed by the path)?$'))
def _refuses(world, code, text, path):
    run = _last(world)
    assert run.code == 1, run
    assert run.out == "", run
    assert "Traceback" not in run.err, run
    expected = f"{code}: " + (f"{text}{world.missing_key}" if path else "")
    assert expected in run.err, run
    assert text in run.err, run


@then(parsers.parse('the refusal suggests "{text}"'))
def _suggests(world, text):
    run = _last(world)
    assert any(text in s for s in run.suggestions()), run


@then(parsers.parse('each is refused with {code} and the message "{text}"'))
def _each_refused(world, code, text):
    for run in world.runs:
        assert run.code == 1 and run.out == "" and f"{code}: {text}" in run.err, run


@then(parsers.parse('each refusal suggests "{text}"'))
def _each_suggests(world, text):
    for run in world.runs:
        assert any(text in s for s in run.suggestions()), run


@then(parsers.re(r"the queen narrated, in order, (?P<items>.+)$"))
def _narrated_in_order(world, items):
    _last(world).narrated_in_order(*quoted(items))


@then(parsers.parse('the narration says "{text}"'))
def _says(world, text):
    run = _last(world)
    assert text in run.err, run


@then(parsers.parse('the narration does not say "{text}"'))
def _does_not_say(world, text):
    run = _last(world)
    assert text not in run.err, run


@then(parsers.parse('the narration says rbee is not installed on "{name}" yet and suggests "{command}"'))
def _not_installed_yet(world, name, command):
    run = _last(world)
    assert f"rbee is not installed at {world.tmp / 'node' / 'rbee'} on {name} yet" in run.err, run
    assert f"Next: {command}" in run.err, run


def _node(world: QueenWorld, name: str) -> dict:
    listed = world.nodes()
    assert name in listed, f"{name} not registered: {sorted(listed)}"
    return listed[name]


@then(parsers.parse('node "{name}" is registered as reachable with no backends yet'))
def _reachable_no_backends(world, name):
    node = _node(world, name)
    assert node["status"] == "reachable" and node["backends"] == {} and node["hive_version"] == "", node
    assert node["last_connected_unix_ms"] > 0, node


@then(parsers.parse('node "{name}" is registered as reachable with backends {backend}: {count:d}'))
def _reachable_backends(world, name, backend, count):
    node = _node(world, name)
    assert node["status"] == "reachable" and node["backends"] == {backend: count}, node
    assert node["hive_version"] == "0.1.0", node


@then(parsers.parse('node "{name}" is registered as reachable, last connected just now'))
def _reachable_now(world, name):
    node = _node(world, name)
    assert node["status"] == "reachable" and node["last_error"] == "", node
    assert time.time() * 1000 - node["last_connected_unix_ms"] < 60_000, node


@then(parsers.parse('node "{name}" keeps its status with last error "{code}"'))
def _answered_but_refused(world, name, code):
    node = _node(world, name)
    assert node["status"] == "reachable" and node["last_error"].startswith(f"{code}: "), node


@then(parsers.parse('node "{name}" is registered as unreachable with last error "{code}"'))
def _unreachable(world, name, code):
    node = _node(world, name)
    assert node["status"] == "unreachable" and node["last_error"].startswith(f"{code}: "), node


@then(parsers.parse('node "{name}" still has install path "{path}"'))
def _install_path(world, name, path):
    assert _node(world, name)["install_path"] == path


@then(parsers.parse('node "{name}" has git branch "{branch}"'))
def _branch(world, name, branch):
    assert _node(world, name)["git_branch"] == branch


@then(parsers.parse("node \"{name}\" still has the SSH node's port"))
def _same_port(world, name):
    assert _node(world, name)["ssh_port"] == world.node.port


@then("no node is registered")
def _none(world):
    assert world.nodes() == {}


@then("each install step was narrated with its duration: checking git and python3, fetching the repository, "
      "setting up the Python environment, verifying the hive program")  # fmt: skip
def _install_steps(world):
    run = _last(world)
    steps = ("Checking git and python3", f"Fetching {world.repo} (main)",
             "Setting up the Python environment", "Verifying the hive program")  # fmt: skip
    at = 0
    for step in steps:
        match = re.compile(rf"✅ {re.escape(step)}.*\((\d+\.\d)s\)").search(run.err, at)
        assert match, f"step {step!r} not narrated with a duration:\n{run}"
        at = match.end()


@then("the SSH node saw no authentication attempt and the queen was not asked to connect")
def _nothing_sent(world):
    run = _last(world)
    assert world.node.auth_attempts == [], world.node.auth_attempts
    assert "Connecting" not in run.err and "Testing the connection" not in world.queen.text(), run


@then(parsers.re(r"attempts 1/3, 2/3 and 3/3 were narrated(?:, each ending in \"(?P<reason>[^\"]+)\")?$"))
def _three_attempts(world, reason):
    run = _last(world)
    run.narrated_in_order(*(f"(attempt {i}/3)" for i in (1, 2, 3)))
    if reason:
        for i in (1, 2, 3):
            assert f"SSH attempt {i}/3 to {world.node.user}@127.0.0.1:{world.port} failed: {reason}" in run.err, run
        # Each attempt waited out the queen's connect timeout (2 s in the tests).
        assert run.seconds >= 3 * 2.0, run.seconds


@then("only attempt 1/3 was narrated")
def _one_attempt(world):
    run = _last(world)
    assert "attempt 1/3" in run.err and "attempt 2/3" not in run.err, run


@then("the error names the host 127.0.0.1 and the listener's port")
def _names_target(world):
    run = _last(world)
    assert f"127.0.0.1:{world.port}" in run.err and f"port: {world.port}" in run.err, run


@then("the table has the columns NAME, HOST, STATUS, LAST CONNECTED, INSTALL PATH, BACKENDS and HIVE")
def _columns(world):
    run = _last(world)
    assert run.code == 0, run
    header = next(line for line in run.out.splitlines() if "NAME" in line)
    cols = ("NAME", "HOST", "STATUS", "LAST CONNECTED", "INSTALL PATH", "BACKENDS", "HIVE")
    positions = [header.find(c) for c in cols]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), header


@then(parsers.parse('the table has a row for "{a}" and a row for "{b}", each reachable, with its install path '
                    "and the node's user@host:port"))  # fmt: skip
def _rows(world, a, b):
    run = _last(world)
    target = f"{world.node.user}@{world.node.host}:{world.node.port}"
    for name in (a, b):
        [row] = [line for line in run.out.splitlines() if f" {name} " in line]
        assert target in row and "reachable" in row and f"/opt/rbee-{name}" in row, row


@then("stdout holds one JSON object per node, in name order, each with its name, ssh_host, ssh_port, status, "
      "last_connected_unix_ms and install_path")  # fmt: skip
def _json_rows(world):
    run = _last(world)
    assert run.code == 0, run
    rows = [json.loads(line) for line in run.out.splitlines()]
    assert [r["name"] for r in rows] == ["alpha", "beta"], rows
    for row in rows:
        assert row["ssh_host"] == world.node.host and row["ssh_port"] == world.node.port, row
        assert row["status"] == "reachable" and row["last_connected_unix_ms"] > 0, row
        assert row["install_path"] == f"/opt/rbee-{row['name']}", row


@then('stdout is empty and the narration says "No nodes registered"')
def _empty(world):
    run = _last(world)
    assert run.out == "" and "No nodes registered" in run.err, run


@then("the refusal shows the node's host key fingerprint")
def _fingerprint(world):
    run = _last(world)
    assert world.node.host_key_fingerprint in run.err, run


@then("the narration says the new host key was trusted and recorded")
def _trusted(world):
    run = _last(world)
    assert f"Trusted the new host key of [127.0.0.1]:{world.node.port}" in run.err, run
    assert world.node.host_key_fingerprint in run.err and str(world.known_hosts) in run.err, run


@then("the queen's known_hosts file holds the node's key and is readable by its owner only")
def _recorded(world):
    text = world.known_hosts.read_text()
    assert world.node.known_hosts_line in text, text
    assert stat.S_IMODE(world.known_hosts.stat().st_mode) == 0o600


@then("the refusal shows the recorded fingerprint and the presented one")
def _both_fingerprints(world):
    run = _last(world)
    assert world.old_fingerprint in run.err and world.node.host_key_fingerprint in run.err, run
    assert world.old_fingerprint != world.node.host_key_fingerprint


@then("the queen's known_hosts file is unchanged")
def _unchanged(world):
    assert world.known_hosts.read_text() == world.known_hosts_before


@then("the latency is reported in milliseconds, a warning only above 100ms")
def _latency_ok(world):
    # Over OpenSSH the round trip includes the login shell's start-up on the
    # node (a heavy ~/.bashrc alone can pass 100 ms), so either form may show.
    run = _last(world)
    match = re.search(r"(✅|⚠️) SSH latency: (\d+)ms( \(above 100ms: expect slower starts\))?\n", run.err)
    assert match, run
    slow = int(match.group(2)) > 100
    assert (match.group(1) == "⚠️") == slow and bool(match.group(3)) == slow, run


@then(parsers.parse('the latency is reported in milliseconds as a warning "{text}"'))
def _latency_warning(world, text):
    run = _last(world)
    assert re.search(rf"⚠️ SSH latency: \d+ms \({re.escape(text)}", run.err), run


@then("the preflight started no hive")
def _no_hive_started(world):
    run = _last(world)
    assert "Starting rbee-hive" not in run.err and node_hive_pids(world.node_home) == [], run


@then("one hive runs for the node, with its log in the node's RBEE_HOME and its key file readable by its owner only")
def _hive_runs(world):
    [pid] = node_hive_pids(world.node_home)
    world.hive_pid = pid
    assert psutil.Process(pid).cmdline()[1] == str(world.install_path / ".venv" / "bin" / "rbee-hive")
    assert (world.node_home / "logs" / "hive.log").is_file()
    assert stat.S_IMODE((world.node_home / "hive.key").stat().st_mode) == 0o600


@then(parsers.parse('node "{name}" is listed with its hive up and started by this queen'))
def _hive_listed(world, name):
    node = _node(world, name)
    assert node["hive_running"] and node["hive_started_by_queen"] and node["hive_port"] == world.hive_port, node


@then(parsers.parse('the narration says the hive this queen had started on "{name}" was stopped, naming its pid'))
def _hive_stopped(world, name):
    run = _last(world)
    assert f"Stopped the hive this queen had started on {name} (pid {world.hive_pid})" in run.err, run


@then("no hive runs for the node")
def _no_hive(world):
    gone = [pid for pid in node_hive_pids(world.node_home) if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert gone == []


@then("the node's certificates are in its RBEE_HOME, the keys readable by their owner only")
def _node_certs(world):
    folder = world.node_home / "tls"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("ca.crt", "hive.crt", "hive-issuer.crt"):
        assert (folder / name).read_text().startswith("-----BEGIN CERTIFICATE-----")
    for name in ("hive.key", "hive-issuer.key"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    # The node's CA is the queen's.
    assert (folder / "ca.crt").read_bytes() == (world.queen.home / "tls" / "ca.crt").read_bytes()


@then("the node's hive answers a client of the cluster CA and refuses clear text and strangers")
def _hive_mtls(world):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from rbee.channel import open_channel
    from rbee.tls import ClusterCA

    address = f"127.0.0.1:{world.hive_port}"

    async def health(tls) -> bool:
        async with open_channel(address, tls) as channel:
            try:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except Exception:  # noqa: BLE001 - any failure is a refusal here
                return False
        return True

    assert world.run(health(ClusterCA(world.queen.home).client_identity()))
    assert not world.run(health(None))
    assert not world.run(health(ClusterCA(world.tmp / "stranger").client_identity()))


@then(parsers.parse('node "{name}" is listed with TLS'))
def _listed_tls(world, name):
    assert _node(world, name)["tls"] is True
    run = world.keeper("setup", "list-nodes")
    assert run.code == 0 and " TLS" in run.out, run
