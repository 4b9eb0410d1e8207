"""The queen's link to one node's hive: health, hive preflight (S4.2), and
starting the hive over the node's transport when it does not answer (S3)."""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from rbee.backends import backend_name
from rbee.channel import metadata, open_channel
from rbee.config import API_VERSION, HIVE_VERSION_REQUIREMENT, VERSION, rbee_home
from rbee.enum_words import HIVE_STATUSES
from rbee.errors import RbeeError, from_rpc_error
from rbee.tls import CA_CERT, HIVE_CERT, HIVE_KEY, ISSUER_CERT, ISSUER_KEY, TLS_DIR, ClusterCA, TlsIdentity
from rbee.tls_identity import node_identity
from rbee.v1 import common_pb2, preflight_pb2, preflight_pb2_grpc, provisioning_pb2, provisioning_pb2_grpc, registry_pb2_grpc

from rbee_queen.hive_minimums import check_minimums
from rbee_queen.nodes.store import NodeRecord
from rbee_queen.nodes.transport import NodeTransport

HEALTH_PROBE_TIMEOUT_S = 2.0
# Before the queen decides a node's hive is down (and starts it), it asks
# three times, 200 ms and then 400 ms apart (docs/queen.md, "Reaching a hive").
PROBE_BACKOFF_S = (0.2, 0.4)
CALL_TIMEOUT_S = 30.0
HIVE_KEY_FILE = "hive.key"
HIVE_LOG = "logs/hive.log"
LOG_TAIL_LINES = 20

Check = Callable[..., None]  # check(name, passed, message, warning=False, **details)


_CLUSTER: dict[str, ClusterCA] = {}


def use_cluster_ca(ca: ClusterCA) -> None:
    """The queen's CA (set once by the queen at start)."""
    _CLUSTER["ca"] = ca


def cluster_ca() -> ClusterCA:
    if "ca" not in _CLUSTER:
        _CLUSTER["ca"] = ClusterCA(rbee_home())
    return _CLUSTER["ca"]


def tls_name(record: NodeRecord) -> str:
    """The identity name of this registration's hive (rbee/tls_identity.py):
    a node removed and added again gets another."""
    return node_identity(record.name, record.created_at_unix)


def client_tls(record: NodeRecord) -> TlsIdentity | None:
    """What the queen presents to a node's hive: its client certificate when
    the node serves TLS, checking that the hive proves the node's identity."""
    return cluster_ca().client_identity().for_peer(tls_name(record)) if record.tls else None


async def deliver_tls(transport: NodeTransport, record: NodeRecord, home: str, narrate: Callable[..., None]) -> list[str]:
    """Issue the node's hive certificate and issuing certificate with the
    cluster CA and write them to the node over ``transport`` (a link whose host
    key the queen verified). Returns the hive's TLS flags."""
    folder = f"{home}/{TLS_DIR}"
    hosts = [h for h in {record.ssh_host, record.hive_host} if h]
    bundle = await asyncio.to_thread(cluster_ca().node_bundle, record.name, hosts, tls_name(record))
    for name, (data, mode) in bundle.items():
        await transport.write_file(f"{folder}/{name}", data.decode(), mode)
    narrate("🔐", f"Issued {record.name}'s hive certificate ({', '.join(hosts)}) with the cluster CA; written to {folder}")
    return [
        "--tls-cert", f"{folder}/{HIVE_CERT}", "--tls-key", f"{folder}/{HIVE_KEY}", "--tls-ca", f"{folder}/{CA_CERT}",
        "--tls-issuer-cert", f"{folder}/{ISSUER_CERT}", "--tls-issuer-key", f"{folder}/{ISSUER_KEY}",
    ]  # fmt: skip


async def _serving(health: health_pb2_grpc.HealthStub, timeout: float, wait: bool) -> bool:
    try:
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=wait)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class HiveLink:
    """A gRPC channel to a node's hive with the node's key on every call
    (mutual TLS when the node has a certificate of the cluster CA)."""

    def __init__(self, record: NodeRecord) -> None:
        self.record = record
        self.address = record.hive_address
        self._channel = open_channel(self.address, client_tls(record))
        self.md = metadata(record.hive_key)
        self.preflight = preflight_pb2_grpc.PreflightServiceStub(self._channel)
        self.provisioning = provisioning_pb2_grpc.ProvisioningServiceStub(self._channel)
        self.workers = registry_pb2_grpc.HiveWorkerServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def __aenter__(self) -> "HiveLink":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serving(self, timeout: float = HEALTH_PROBE_TIMEOUT_S, wait: bool = False) -> bool:
        """Whether the hive answers its (open) health check as SERVING within ``timeout``."""
        return await _serving(self._health, timeout, wait)

    async def reachable(self, narrate: Callable[..., None], backoff: tuple[float, ...] = PROBE_BACKOFF_S) -> bool:
        """``serving`` tried 1 + len(backoff) times, each retry narrated with
        its delay; False only when every attempt failed. Each retry opens a
        fresh channel: one whose connection was refused waits out its own
        reconnect backoff (about a second) and would fail the retry unasked."""
        attempts = len(backoff) + 1
        for attempt in range(1, attempts + 1):
            if attempt == 1:
                if await self.serving():
                    return True
            elif await self._fresh_probe():
                return True
            if attempt < attempts:
                delay = backoff[attempt - 1]
                narrate("🔁", f"Cannot connect to rbee-hive at {self.address} (attempt {attempt}/{attempts}); "
                        f"trying again in {delay * 1000:.0f} ms")  # fmt: skip
                await asyncio.sleep(delay)
        narrate("⚠️", f"Cannot connect to rbee-hive at {self.address} after {attempts} attempts")
        return False

    async def _fresh_probe(self) -> bool:
        # A subchannel of its own: gRPC shares subchannels between channels
        # of one target, and the shared one may still be backing off.
        channel = open_channel(self.address, client_tls(self.record), options=(("grpc.use_local_subchannel_pool", 1),))
        try:
            return await _serving(health_pb2_grpc.HealthStub(channel), HEALTH_PROBE_TIMEOUT_S, wait=False)
        finally:
            await channel.close(grace=None)

    async def call(self, method, request, timeout: float = CALL_TIMEOUT_S):
        try:
            return await method(request, metadata=self.md, timeout=timeout)
        except grpc.RpcError as err:
            error = from_rpc_error(err, self.address)
            if error.code in ("MISSING_API_KEY", "INVALID_API_KEY"):
                error.details["node"] = self.record.name
                error.suggestions = [
                    f"The hive at {self.address} was started with another key than the queen holds for node "
                    f"{self.record.name}: stop that hive, then run `rbee-keeper setup check-node --name {self.record.name}`"
                ]
            raise error from None


def compatible(version: str, api_version: str) -> str | None:
    """None when a hive of ``version``/``api_version`` works with this queen, else why not."""
    if api_version != API_VERSION:
        return f"API version {api_version or '(none)'} (this queen speaks {API_VERSION})"
    try:
        if Version(version) not in SpecifierSet(HIVE_VERSION_REQUIREMENT):
            return f"version {version} (this queen needs {HIVE_VERSION_REQUIREMENT})"
    except (InvalidVersion, InvalidSpecifier):
        return f"version {version!r} (not a version this queen understands)"
    return None


def hive_is_newer(version: str, api_version: str) -> bool:
    """Whether a hive this queen refuses is the newer side (a later API or a
    version past the requirement), so the queen is what needs updating."""
    if api_version != API_VERSION:
        try:
            return int(api_version.lstrip("v")) > int(API_VERSION.lstrip("v"))
        except ValueError:
            return False
    try:
        return Version(version) > Version(VERSION) and Version(version) not in SpecifierSet(HIVE_VERSION_REQUIREMENT)
    except (InvalidVersion, InvalidSpecifier):
        return False


def mismatch_advice(node: str, version: str, api_version: str) -> list[str]:
    """What to do about a hive of another release: update this machine's rbee
    when the hive is newer, reinstall the node when it is older."""
    if hive_is_newer(version, api_version):
        return [
            f"The hive on {node} is newer than this queen ({VERSION}): update rbee on this machine "
            "(in its checkout: `git pull && make setup`), then restart the queen (`queen-rbee daemon`)",
            f"Or put this release on the node: `rbee-keeper setup install --node {node}`",
        ]
    return [f"The hive on {node} is older than this queen: update it with `rbee-keeper setup install --node {node}`"]


def hive_is_healthy(status: str) -> bool:
    """``status``: HIVE_STATUSES' word ("healthy", also for a first-release hive's "ok")."""
    return status == "healthy"


async def node_home(transport: NodeTransport, record: NodeRecord) -> str:
    """RBEE_HOME of the hive on the node (the node user's ~/.rbee unless set)."""
    if record.rbee_home:
        return record.rbee_home.rstrip("/")
    result = await transport.check('printf %s "$HOME/.rbee"', "Finding the node's home folder")
    return result.stdout.strip()


def bind_host(record: NodeRecord) -> str:
    """Where the hive listens: loopback when the queen reaches it there, else every address."""
    return "127.0.0.1" if record.hive_host.startswith("127.") or record.hive_host == "::1" else "0.0.0.0"


async def start_hive(
    transport: NodeTransport,
    record: NodeRecord,
    narrate: Callable[..., None],
    timeout: float,
) -> int:
    """Start the node's hive detached over ``transport`` and wait for its health.
    The key reaches it through a 0600 file, never argv or the environment.
    Returns the hive's pid on the node."""
    home = await node_home(transport, record)
    key_file = f"{home}/{HIVE_KEY_FILE}"
    log_file = f"{home}/{HIVE_LOG}"
    await transport.write_file(key_file, record.hive_key + "\n", 0o600)
    if record.tls:
        flags = await deliver_tls(transport, record, home, narrate)
    else:
        # A node registered without TLS whose hive listens beyond loopback:
        # the operator chose clear text (`setup add-node --no-tls`).
        flags = ["--insecure"] if bind_host(record) != "127.0.0.1" else []
    command = (
        # RBEE_HIVE_STDOUT_LOG: the hive rotates the log its output goes to (a
        # variable, not a flag, which a hive of an older release would refuse).
        f"env RBEE_HOME={shlex.quote(home)} RBEE_HIVE_WORKER_HOST={bind_host(record)} "
        f"RBEE_HIVE_STDOUT_LOG={shlex.quote(log_file)} {shlex.quote(record.hive_program)} daemon "
        f"--host {bind_host(record)} --port {record.hive_port} --api-key-file {shlex.quote(key_file)}"
        + "".join(f" {shlex.quote(f)}" for f in flags)
    )
    narrate("🚀", f"Starting rbee-hive on {record.name} ({transport.target}), port {record.hive_port}, log {log_file}")
    # Where this start's lines begin in the (appended) log, so a failure shows only them.
    size = await transport.run(f"stat -c %s {shlex.quote(log_file)} 2>/dev/null || echo 0", timeout=10)
    offset = int(size.stdout.strip() or 0) if size.stdout.strip().isdigit() else 0
    pid = await transport.start_detached(command, log_file, cwd=record.install_path)
    link = HiveLink(record)
    try:
        waiter = asyncio.ensure_future(link.serving(timeout=timeout, wait=True))
        while not waiter.done():
            done, _ = await asyncio.wait({waiter}, timeout=0.5)
            if done:
                break
            alive = await transport.run(f"kill -0 {pid} 2>/dev/null", timeout=10)
            if not alive.ok:
                waiter.cancel()
                raise await _start_failed(transport, record, log_file, "exited before answering", offset)
        if not waiter.result():
            raise await _start_failed(transport, record, log_file, f"did not answer within {timeout:g}s", offset)
    finally:
        await link.close()
    narrate("✅", f"rbee-hive on {record.name} is up at {record.hive_address} (pid {pid})")
    return pid


async def _start_failed(transport: NodeTransport, record: NodeRecord, log_file: str, why: str, offset: int = 0) -> RbeeError:
    tail = await transport.run(f"tail -c +{offset + 1} {shlex.quote(log_file)} | tail -n {LOG_TAIL_LINES}", timeout=10)
    lines = tail.stdout.strip()
    suggestions = [f"Read the hive's log on the node ({log_file})"]
    if "PORT_IN_USE" in lines:
        suggestions.append(f"Port {record.hive_port} is taken on the node: stop what holds it, or move the hive with "
                           f"`rbee-keeper setup update-node --name {record.name} --hive-port PORT`")  # fmt: skip
    else:
        suggestions.append(f"If the hive program is broken, reinstall with `rbee-keeper setup install --node {record.name}`")
    return RbeeError(
        "HIVE_START_FAILED",
        f"rbee-hive on node {record.name} {why}",
        {"node": record.name, "hive": record.hive_address, "log": log_file, "last_lines": lines or "(empty)"},
        suggestions,
    )


async def port_answers(address: str, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at host:port."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout)
    except (OSError, asyncio.TimeoutError, ValueError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


async def stop_hive(transport: NodeTransport, pid: int, timeout: float = 40.0) -> bool:
    """SIGTERM the hive (it stops its workers), wait for it to go; True when gone."""
    await transport.run(f"kill -TERM {pid} 2>/dev/null", timeout=10)
    waited = await transport.run(
        f"for i in $(seq {int(timeout * 5)}); do kill -0 {pid} 2>/dev/null || exit 0; sleep 0.2; done; exit 1",
        timeout=timeout + 10,
    )
    return waited.ok


async def hive_preflight(
    link: HiveLink, record: NodeRecord, check: Check, settings: Any, backend: str | None = None
) -> preflight_pb2.GetHiveHealthResponse:
    """S4.2 from the queen: health, version compatibility, backends, resources
    above the floor for ``backend`` (any backend the node has when None;
    rbee_queen/hive_minimums.py), worker environments. The first failure raises."""
    health = await link.call(link.preflight.GetHiveHealth, preflight_pb2.GetHiveHealthRequest())
    status = HIVE_STATUSES.word(health.hive_status)
    check("hive_health", hive_is_healthy(status), f"Hive health: {status} (rbee-hive {health.version}, API {health.api_version}, "
          f"up {health.uptime_ms // 1000}s, {health.workers} workers)", version=health.version, api_version=health.api_version)
    if not hive_is_healthy(status):
        raise RbeeError("HIVE_UNREACHABLE", f"The hive on {record.name} is {status}", {"node": record.name, "status": status})
    problem = compatible(health.version, health.api_version)
    if problem:
        check("hive_version", False, f"Hive on {record.name} has {problem}")
        raise RbeeError(
            "VERSION_MISMATCH",
            f"The hive on node {record.name} is rbee-hive {health.version} (API {health.api_version}); "
            f"this queen is {VERSION} (API {API_VERSION}) and needs {HIVE_VERSION_REQUIREMENT}",
            {"node": record.name, "hive_version": health.version, "hive_api_version": health.api_version,
             "queen_version": VERSION, "queen_api_version": API_VERSION},
            mismatch_advice(record.name, health.version, health.api_version),
        )  # fmt: skip
    check("hive_version", True, f"Hive version {health.version} is compatible ({HIVE_VERSION_REQUIREMENT}, API {health.api_version})")
    backends = await link.call(link.preflight.GetBackends, preflight_pb2.GetBackendsRequest())
    # A backend a newer hive knows and this queen does not is left out.
    available = [b for b in backends.backends if b.available and b.name in common_pb2.Backend.values()]
    names = [backend_name(b.name) for b in available]
    summary = ", ".join(f"{backend_name(b.name)} ({b.device_count} device{'s' if b.device_count != 1 else ''})" for b in available)
    check("backends", bool(available), f"Backends: {summary or 'none available'}",
          backends=",".join(names))  # fmt: skip
    if not available:
        raise RbeeError("BACKEND_UNAVAILABLE", f"The hive on {record.name} has no backend available", {"node": record.name})
    res = await link.call(link.preflight.GetResources, preflight_pb2.GetResourcesRequest())
    mb = 1024 * 1024
    gpus = "; ".join(f"GPU {g.index} {g.name}: {g.vram_available_bytes // mb} of {g.vram_total_bytes // mb} MB VRAM free" for g in res.gpus)
    check(
        "resources", True,
        f"Resources: RAM {res.ram_available_bytes // mb} of {res.ram_total_bytes // mb} MB available, "
        f"disk {res.disk_available_bytes // mb} of {res.disk_total_bytes // mb} MB free at {res.disk_path}" + (f"; {gpus}" if gpus else ""),
        ram_available_mb=res.ram_available_bytes // mb, disk_available_mb=res.disk_available_bytes // mb,
    )  # fmt: skip
    check_minimums(settings, record.name, res, names, backend, check)
    envs = await link.call(link.provisioning.ListWorkerEnvironments, provisioning_pb2.ListWorkerEnvironmentsRequest())
    have = sorted({backend_name(e.backend) for e in envs.environments})
    missing = [b for b in names if b not in have]
    if missing:
        check("worker_environments", True, f"No worker environment yet for {', '.join(missing)}: "
              "the hive installs one on the first spawn", warning=True)  # fmt: skip
    else:
        check("worker_environments", True, f"Worker environments installed for {', '.join(have)}")
    return health
