"""What the queen does with nodes: register (connection tested first), update,
remove, list, install rbee there, and check them (SSH preflight, the hive
started when it does not answer, hive preflight). Every operation narrates
through a relay; the transport (SSH or local) is chosen here and nowhere else."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import time
from pathlib import Path

from rbee.auth import new_api_key
from rbee.backends import BACKENDS, backend_enum, backend_name
from rbee.config import remote_settings
from rbee.enum_words import TRANSPORTS
from rbee.errors import RbeeError
from rbee.narration import Narrator
from rbee.v1 import common_pb2, nodes_pb2, preflight_pb2

from rbee.tls import is_loopback
from rbee_queen.hives import HiveLink, deliver_tls, hive_preflight, node_home, port_answers, start_hive, stop_hive, tls_name
from rbee_queen.nodes.install import Installer
from rbee_queen.nodes.local import LocalTransport
from rbee_queen.nodes.relay import EventRelay, NodeEventRelay
from rbee_queen.nodes.store import NodeRecord, NodeStore, node_exists
from rbee_queen.nodes.transport import NodeTransport
from rbee_queen.nodes.validation import check_node_fields
from rbee_queen.settings import QueenSettings

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_SSH_PORT = 22
DEFAULT_HIVE_PORT = 7900
LIST_PROBE_TIMEOUT_S = 1.0
_STATUS = {
    "unknown": nodes_pb2.NODE_STATUS_UNKNOWN,
    "reachable": nodes_pb2.NODE_STATUS_REACHABLE,
    "unreachable": nodes_pb2.NODE_STATUS_UNREACHABLE,
}


def own_installation() -> str:
    """The checkout this queen runs from (a local node's default install path)."""
    root = Path(__file__).resolve().parents[2]
    return str(root) if (root / "pyproject.toml").is_file() else ""


def _invalid(field: str, message: str, suggestion: str = "") -> RbeeError:
    return RbeeError("INVALID_ARGUMENT", message, {"field": field}, [suggestion] if suggestion else [])


def _ssh_key_missing(path: str) -> RbeeError:
    return RbeeError(
        "SSH_KEY_NOT_FOUND",
        f"SSH key not found: {path}",
        {"path": path},
        ["Pass the private key the node accepts with --ssh-key PATH (e.g. ~/.ssh/id_ed25519)"],
    )


class NodeManager:
    def __init__(self, settings: QueenSettings, store: NodeStore, log: Narrator) -> None:
        self.settings = settings
        self.store = store
        self.log = log
        # node name -> pid of the hive this queen process started there.
        self.started_hives: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # -- transports -----------------------------------------------------------------------

    def transport(self, record: NodeRecord, relay: EventRelay, trust_host_key: bool = False) -> NodeTransport:
        if record.is_local:
            return LocalTransport(record.name, relay.narrate)
        from rbee_queen.nodes.ssh import SshTransport

        s = self.settings
        return SshTransport(
            record.name,
            record.ssh_host,
            record.ssh_port,
            record.ssh_user,
            Path(record.ssh_key_path).expanduser(),
            known_hosts=[s.known_hosts, Path.home() / ".ssh" / "known_hosts"],
            record_known_hosts=s.known_hosts,
            trust_host_key=trust_host_key,
            connect_timeout=s.ssh_connect_timeout.total_seconds(),
            attempts=s.ssh_attempts,
            narrate=relay.narrate,
        )

    async def _connect(self, record: NodeRecord, relay: EventRelay, trust_host_key: bool = False,
                       saved: bool = True) -> NodeTransport:  # fmt: skip
        """An open transport, with reachable/host key/authenticated reported; a
        failure is recorded on a saved node (last_error; status unreachable
        when nothing answered)."""
        transport = self.transport(record, relay, trust_host_key)
        try:
            await transport.connect()
        except RbeeError as err:
            answered = err.code in ("SSH_AUTH_FAILED", "SSH_HOST_KEY_UNKNOWN", "SSH_HOST_KEY_CHANGED")
            if answered:
                relay.check("reachable", True, f"{record.name} is reachable ({transport.target})")
                relay.check("host_key" if err.code.startswith("SSH_HOST_KEY") else "authenticated", False, err.message)
            else:
                relay.check("reachable", False, err.message)
            if saved:
                if answered:
                    self.store.update(record.name, last_error=f"{err.code}: {err.message}"[:2000])
                else:
                    self.store.mark_unreachable(record.name, f"{err.code}: {err.message}")
            raise
        if not record.is_local:
            relay.check("reachable", True, f"{record.name} is reachable ({transport.target})")
            relay.check("authenticated", True, f"Authenticated as {record.ssh_user} with {record.ssh_key_path}")
        return transport

    # -- registry -------------------------------------------------------------------------

    def _record_from(self, req: nodes_pb2.AddNodeRequest) -> NodeRecord:
        name = req.name.strip()
        if not NAME.fullmatch(name):
            raise _invalid("name", f"Invalid node name {req.name!r}: use letters, digits, '.', '_' or '-' (up to 64)")
        # Without --install-path: this installation for a local node, else the
        # repo_dir of the config file's [remote] section (where rbee lives on nodes).
        install_path = req.install_path.strip() or (own_installation() if req.local else remote_settings().repo_dir)
        if not install_path:
            raise _invalid("install_path", "A node needs --install-path (where rbee is installed on it)",
                           "Or set repo_dir in the [remote] section of the config file for every node")  # fmt: skip
        if not install_path.startswith("/"):
            raise _invalid("install_path", f"--install-path must be absolute on the node: {install_path}")
        if req.rbee_home and not req.rbee_home.startswith("/"):
            raise _invalid("rbee_home", f"--rbee-home must be absolute on the node: {req.rbee_home}")
        hive_port = req.hive_port or DEFAULT_HIVE_PORT
        if not 1 <= hive_port <= 65535:
            raise _invalid("hive_port", f"Hive port {hive_port} is outside 1-65535")
        record = NodeRecord(
            name=name,
            transport="local" if req.local else "ssh",
            install_path=install_path.rstrip("/") or "/",
            hive_key=new_api_key(),
            git_repo_url=req.git_repo_url.strip(),
            git_branch=req.git_branch.strip() or "main",
            rbee_home=req.rbee_home.strip().rstrip("/"),
            hive_port=hive_port,
            remote_hive_program=self.store.hive_program,
        )
        if not req.local:
            record.ssh_host = req.ssh_host.strip()
            record.ssh_port = req.ssh_port or DEFAULT_SSH_PORT
            record.ssh_user = req.ssh_user.strip()
            record.ssh_key_path = req.ssh_key_path.strip()
            for field, option in (("ssh_host", "--ssh-host"), ("ssh_user", "--ssh-user"), ("ssh_key_path", "--ssh-key")):
                if not getattr(record, field):
                    raise _invalid(field, f"An SSH node needs {option}",
                                   "Or register this machine with --local")  # fmt: skip
            if not 1 <= record.ssh_port <= 65535:
                raise _invalid("ssh_port", f"SSH port {record.ssh_port} is outside 1-65535")
        check_node_fields(record.__dict__, record.is_local)
        # TLS unless told otherwise whenever the node's links leave this machine (S13).
        record.tls = req.tls if req.HasField("tls") else not is_loopback(record.hive_host)
        return record

    def _check_key(self, record: NodeRecord) -> None:
        if not record.is_local and not Path(record.ssh_key_path).expanduser().is_file():
            raise _ssh_key_missing(record.ssh_key_path)

    async def add(self, req: nodes_pb2.AddNodeRequest, relay: EventRelay) -> nodes_pb2.Node:
        record = self._record_from(req)
        async with self.lock(record.name):
            if self.store.exists(record.name):
                raise node_exists(record.name)
            self._check_key(record)
            relay.narrate("🔌", f"Testing the connection to {record.name}")
            transport = await self._connect(record, relay, req.trust_host_key, saved=False)
            try:
                await self._echo(transport, relay)
                record.backends, record.hive_version = await self._detect(transport, record, relay)
                if record.tls:
                    # The registration's time is part of the node's identity name.
                    record.created_at_unix = int(time.time())
                    await deliver_tls(transport, record, await node_home(transport, record), relay.narrate)
            finally:
                await transport.close()
            record.status = "reachable"
            record.last_connected_unix = int(time.time())
            self.store.add(record)
            relay.narrate("✅", f"Node {record.name} saved ({record.transport}, install path {record.install_path})")
            return await self.to_proto(record, probe=False)

    async def update(self, req: nodes_pb2.UpdateNodeRequest, relay: EventRelay) -> nodes_pb2.Node:
        async with self.lock(req.name):
            record = self.store.get(req.name)
            changes: dict[str, object] = {}
            for field in ("ssh_host", "ssh_port", "ssh_user", "ssh_key_path", "git_repo_url", "git_branch",
                          "install_path", "rbee_home", "hive_port", "tls"):  # fmt: skip
                if req.HasField(field):
                    value = getattr(req, field)
                    changes[field] = value.strip() if isinstance(value, str) else value
            if not changes:
                raise _invalid("fields", f"Nothing to change for node {req.name}: pass at least one option to change")
            candidate = NodeRecord(**{**record.__dict__, **changes})
            # What add-node would refuse, update-node refuses too.
            check_node_fields(candidate.__dict__, candidate.is_local)
            if record.is_local and any(k.startswith("ssh_") for k in changes):
                raise _invalid("ssh_host", f"Node {req.name} is this machine (local): it has no SSH settings",
                               f"Remove it and add it again without --local: `rbee-keeper setup remove-node --name {req.name}`")  # fmt: skip
            if any(k.startswith("ssh_") for k in changes) or req.trust_host_key:
                self._check_key(candidate)
                relay.narrate("🔌", f"Testing the new connection to {req.name}")
                transport = await self._connect(candidate, relay, req.trust_host_key, saved=False)
                try:
                    await self._echo(transport, relay)
                finally:
                    await transport.close()
                changes.update(status="reachable", last_connected_unix=int(time.time()), last_error="")
            if "tls" in changes and changes["tls"] != record.tls and self.started_hives.get(req.name):
                relay.narrate("⚠️", f"The hive running on {req.name} keeps its old setting until it restarts: "
                              f"stop that hive, or `rbee-keeper setup remove-node --name {req.name}` (which stops it) and add it again", "warn")  # fmt: skip
            record = self.store.update(req.name, **changes)
            relay.narrate("✅", f"Node {req.name} updated: {', '.join(sorted(k for k in changes if k in nodes_pb2.UpdateNodeRequest.DESCRIPTOR.fields_by_name))}")
            return await self.to_proto(record)

    async def remove(self, name: str) -> nodes_pb2.RemoveNodeResponse:
        async with self.lock(name):
            record = self.store.get(name)
            pid = self.started_hives.pop(name, None)
            stopped = False
            if pid:
                relay = NodeEventRelay(self.log)
                transport = self.transport(record, relay)
                try:
                    await transport.connect()
                    stopped = await stop_hive(transport, pid)
                    message = f"Stopped the hive this queen had started on {name} (pid {pid})"
                except RbeeError as err:
                    message = f"Could not stop the hive this queen started on {name} (pid {pid}): {err.message}"
                finally:
                    await transport.close()
            else:
                message = f"Nothing stopped on {name}: this queen did not start its hive"
            self.store.remove(name)
            return nodes_pb2.RemoveNodeResponse(node=await self.to_proto(record, probe=False), hive_stopped=stopped, message=message)

    async def list(self) -> list[nodes_pb2.Node]:
        return list(await asyncio.gather(*(self.to_proto(r) for r in self.store.list())))

    # -- install, check -------------------------------------------------------------------

    async def install(self, name: str, relay: EventRelay) -> nodes_pb2.Node:
        async with self.lock(name):
            record = self.store.get(name)
            transport = await self._connect(record, relay)
            try:
                if record.is_local and record.install_path == own_installation():
                    relay.narrate("🏠", f"{record.install_path} is this queen's own installation: nothing to install")
                    version = (await transport.check(f"{shlex.quote(record.hive_program)} --version", "Verifying the hive program")).stdout.strip()
                else:
                    version = await Installer(
                        transport, record, relay.narrate, self.settings.install_step_timeout.total_seconds(),
                        self.settings.install_engine_site,
                    ).run()  # fmt: skip
                backends, _ = await self._detect(transport, record, relay)
            finally:
                await transport.close()
            record = self.store.update(name, hive_version=version.split()[-1] if version else "", backends=backends,
                                       status="reachable", last_connected_unix=int(time.time()), last_error="")  # fmt: skip
            return await self.to_proto(record)

    async def check(self, name: str, relay: EventRelay, ssh_only: bool = False) -> nodes_pb2.Node:
        async with self.lock(name):
            record = self.store.get(name)
            transport = await self._connect(record, relay)
            try:
                await self._echo(transport, relay)
                version = await self._hive_program(transport, record, relay)
                self.store.update(name, hive_version=version)
                record = self.store.mark_reachable(name)
                if ssh_only:
                    return await self.to_proto(record)
                await self._ensure_hive(transport, record, relay)
            finally:
                await transport.close()
            async with HiveLink(record) as link:
                health = await hive_preflight(link, record, relay.check, self.settings)
                backends = await self._hive_backends(link)
            record = self.store.update(name, hive_version=health.version, backends=backends)
            relay.narrate("🎉", f"Node {name} is ready: rbee-hive {health.version} at {record.hive_address}")
            return await self.to_proto(record)

    async def ensure_ready(self, record: NodeRecord, relay: EventRelay) -> None:
        """The node's hive answering (S1 step 3). A hive that answers needs no
        SSH: the warm path stays off the SSH link. Otherwise the SSH preflight
        runs and the hive is started over the transport."""
        async with self.lock(record.name):
            async with HiveLink(record) as link:
                if await link.reachable(relay.narrate):
                    relay.narrate("✅", f"rbee-hive on {record.name} answers at {record.hive_address}")
                    return
            transport = await self._connect(record, relay)
            try:
                await self._echo(transport, relay)
                self.store.update(record.name, hive_version=await self._hive_program(transport, record, relay))
                await self._ensure_hive(transport, record, relay)
            finally:
                await transport.close()
            self.store.mark_reachable(record.name)

    async def _ensure_hive(self, transport: NodeTransport, record: NodeRecord, relay: EventRelay) -> None:
        async with HiveLink(record) as link:
            if await link.serving():
                relay.check("hive_running", True, f"rbee-hive answers at {record.hive_address}")
                return
        if await port_answers(record.hive_address):
            raise RbeeError(
                "HIVE_UNREACHABLE",
                f"Something listens at {record.hive_address} on node {record.name} but does not answer as a hive "
                "(a stopped or hung rbee-hive, or another program on its port)",
                {"node": record.name, "hive": record.hive_address},
                [f"Check the process that holds port {record.hive_port} on the node (a stopped hive resumes with SIGCONT)",
                 f"Or move the hive with `rbee-keeper setup update-node --name {record.name} --hive-port PORT`"],
            )  # fmt: skip
        relay.narrate("💤", f"No hive answers at {record.hive_address}")
        pid = await start_hive(transport, record, relay.narrate, self.settings.hive_start_timeout.total_seconds())
        self.started_hives[record.name] = pid
        relay.check("hive_running", True, f"rbee-hive started on {record.name} (pid {pid})", pid=pid)

    async def _echo(self, transport: NodeTransport, relay: EventRelay) -> float:
        latency = await transport.round_trip()
        ms = latency * 1000
        relay.check("echo", True, "Command execution works (`echo test` returned `test`)")
        limit = self.settings.latency_warning.total_seconds() * 1000
        slow = ms > limit
        relay.check("latency", True, f"{'SSH' if transport.kind == 'ssh' else 'Round-trip'} latency: {ms:.0f}ms" + (f" (above {limit:.0f}ms: expect slower starts)" if slow else ""),
                    warning=slow, latency_ms=f"{ms:.0f}")  # fmt: skip
        return latency

    async def _hive_program(self, transport: NodeTransport, record: NodeRecord, relay: EventRelay) -> str:
        program = shlex.quote(record.hive_program)
        result = await transport.run(f"{program} --version", timeout=60)
        if result.exit_status == 127 or not result.ok:
            relay.check("hive_program", False, f"rbee-hive not found at {record.hive_program} on {record.name}")
            raise RbeeError(
                "HIVE_NOT_INSTALLED",
                f"rbee-hive is not installed on node {record.name}: {record.hive_program}: command not found",
                {"node": record.name, "path": record.hive_program, "exit_status": result.exit_status, "output": result.tail() or "(no output)"},
                [f"Install it with `rbee-keeper setup install --node {record.name}`"],
            )
        version = result.stdout.strip().split()[-1] if result.stdout.strip() else ""
        relay.check("hive_program", True, f"rbee-hive {version} found at {record.hive_program}", version=version)
        return version

    async def _detect(self, transport: NodeTransport, record: NodeRecord, relay: EventRelay) -> tuple[dict[str, int], str]:
        """Backends and devices from `rbee-hive detect --json` on the node; empty when rbee is not installed yet."""
        program = shlex.quote(record.hive_program)
        probe = await transport.run(f"test -x {program} && {program} --version", timeout=60)
        if not probe.ok:
            relay.narrate("ℹ️", f"rbee is not installed at {record.install_path} on {record.name} yet: "
                          f"run `rbee-keeper setup install --node {record.name}`; backends are detected then")  # fmt: skip
            return {}, ""
        home = await node_home(transport, record)
        result = await transport.check(f"env RBEE_HOME={shlex.quote(home)} {program} detect --json", "Detecting backends (rbee-hive detect)")
        try:
            form = json.loads(result.stdout.strip().splitlines()[-1])
            devices = {str(k): int(v) for k, v in dict(form.get("devices") or {}).items()}
        except (ValueError, IndexError, TypeError, AttributeError):
            raise RbeeError("SSH_COMMAND_FAILED", f"`rbee-hive detect --json` on {record.name} printed no JSON",
                            {"node": record.name, "output": result.tail()}) from None  # fmt: skip
        relay.narrate("🔍", f"Detected on {record.name}: " + ", ".join(f"{b} ({n} device{'s' if n != 1 else ''})" for b, n in devices.items()))
        return devices, probe.stdout.strip().split()[-1] if probe.stdout.strip() else ""

    async def _hive_backends(self, link: HiveLink) -> dict[str, int]:
        reply = await link.call(link.preflight.GetBackends, preflight_pb2.GetBackendsRequest())
        return {backend_name(b.name): b.device_count for b in reply.backends if b.available and b.name in common_pb2.Backend.values()}

    # -- conversion -----------------------------------------------------------------------

    async def to_proto(self, record: NodeRecord, probe: bool = True) -> nodes_pb2.Node:
        running = False
        if probe:
            async with HiveLink(record) as link:
                running = await link.serving(timeout=LIST_PROBE_TIMEOUT_S)
        return nodes_pb2.Node(
            name=record.name,
            connection=TRANSPORTS.number(record.transport),
            ssh_host=record.ssh_host,
            ssh_port=record.ssh_port,
            ssh_user=record.ssh_user,
            ssh_key_path=record.ssh_key_path,
            git_repo_url=record.git_repo_url,
            git_branch=record.git_branch,
            install_path=record.install_path,
            rbee_home=record.rbee_home,
            hive_port=record.hive_port,
            status=_STATUS.get(record.status, nodes_pb2.NODE_STATUS_UNKNOWN),
            last_connected_unix_ms=record.last_connected_unix * 1000,
            last_error=record.last_error,
            backends=[nodes_pb2.BackendDevices(name=backend_enum(b), device_count=n) for b, n in sorted(record.backends.items())
                      if b in BACKENDS],
            hive_version=record.hive_version,
            hive_running=running,
            hive_started_by_queen=record.name in self.started_hives,
            tls=record.tls,
            tls_name=tls_name(record) if record.tls else "",
        )
