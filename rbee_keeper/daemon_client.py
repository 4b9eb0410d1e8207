"""What keeper's clients of a daemon (a worker, a hive, the queen) share: one
channel, connected with retries (S9), the API key on every call, and failures
turned into RbeeError that name the daemon and where the key came from.

Connecting tries CONNECT_ATTEMPTS times, waiting 200 then 400 ms (with jitter)
between attempts, each attempt on a fresh channel: a gRPC channel that failed
once waits out its own reconnect backoff (about a second) before it tries
again, which would turn a 200 ms retry into a 1 s one. After the last attempt
the call fails with CONNECTION_TIMEOUT naming the address and the attempts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Self

import grpc

from rbee.channel import metadata, open_channel as rbee_open_channel
from rbee.client_version import client_metadata
from rbee.errors import RbeeError, from_rpc_error
from rbee.retry import backoff_delays

if TYPE_CHECKING:
    from rbee.tls import TlsIdentity

from rbee_keeper.credentials import explain_auth

CALL_TIMEOUT_S = 30.0
CONNECT_ATTEMPTS = 3
CONNECT_BACKOFF_MS = 200
# How long one attempt may wait for the connection (a host that drops packets).
CONNECT_ATTEMPT_TIMEOUT_S = 10.0

_C = grpc.ChannelConnectivity


def open_channel(address: str, tls: TlsIdentity | None = None) -> grpc.aio.Channel:
    """rbee's client channel with a subchannel of its own: gRPC shares
    subchannels between channels by default, and a fresh channel would then
    inherit the failed one's reconnect backoff. Mutual TLS with ``tls``."""
    return rbee_open_channel(address, tls, (("grpc.use_local_subchannel_pool", 1),))


def keeper_tls(address: str, served: bool | None = None) -> TlsIdentity | None:
    """The keeper's TLS identity for ``address``, or None for plain gRPC.

    ``served`` is what the queen or a hive said of that daemon (Node.tls,
    WorkerInfo.tls). Otherwise RBEE_TLS / ``[keeper] tls`` decides: "on",
    "off", or "auto" (the default) = TLS when the address is beyond loopback,
    where daemons refuse to listen without it unless told --insecure.

    The identity: on the queen's machine the queen's cluster CA issues the
    client certificate ($RBEE_HOME/tls); elsewhere copies of ca.crt,
    client.crt and client.key placed there."""
    from rbee.config import keeper_settings, rbee_home
    from rbee.hosts import is_loopback

    if served is None:
        mode = keeper_settings().tls or "auto"
        served = mode == "on" or (mode == "auto" and not is_loopback(address.rpartition(":")[0]))
    if not served:
        return None  # a plain call: the cryptography package is not even imported
    from rbee.tls import CA_CERT, CA_KEY, CLIENT_CERT, CLIENT_KEY, TLS_DIR, ClusterCA
    home = rbee_home()
    folder = home / TLS_DIR
    if (folder / CA_KEY).exists():
        return ClusterCA(home).client_identity()
    if not all((folder / name).exists() for name in (CA_CERT, CLIENT_CERT, CLIENT_KEY)):
        raise RbeeError(
            "TLS_CLIENT_MISSING",
            f"{address} serves mutual TLS, and this machine has no certificate of the cluster CA in {folder}",
            {"address": address, "folder": str(folder)},
            [
                "Join the cluster: `rbee-keeper setup join QUEEN_HOST:PORT --token TOKEN` "
                "(a token from `rbee-keeper setup enrol-token` on the queen's machine)",
                f"Or copy ca.crt, client.crt and client.key from the queen's machine ($RBEE_HOME/tls) to {folder} "
                f"(then `chmod 600 {folder}/client.key`)",
                "Or run rbee-keeper on the queen's machine, where they are created",
            ],
        )
    from rbee.tls import TlsIdentity

    return TlsIdentity.load(folder / CLIENT_CERT, folder / CLIENT_KEY, folder / CA_CERT)


async def connect_once(channel: grpc.aio.Channel, timeout: float) -> str | None:
    """Drive ``channel`` to READY: None when it is, else why this attempt failed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    state = channel.get_state(try_to_connect=True)
    while state is not _C.READY:
        if state is _C.TRANSIENT_FAILURE:
            return "connection refused or host unreachable"
        if state is _C.SHUTDOWN:
            return "channel closed"
        remaining = deadline - loop.time()
        if remaining <= 0:
            return f"no connection within {timeout:g}s"
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
        except TimeoutError:
            return f"no connection within {timeout:g}s"
        state = channel.get_state(try_to_connect=True)
    return None


def _narrate_retry(line: str) -> None:
    from rbee_keeper.output import say

    say("⏳", line)


def older_daemon(client: "DaemonClient", err: RbeeError) -> RbeeError:
    """gRPC's own UNIMPLEMENTED (the daemon has no such RPC at all, not one of
    rbee's own refusals, which carry their code) means the daemon is of an older release
    than this keeper: say so, and which side to update."""
    if err.details.get("grpc_status") != "UNIMPLEMENTED" or err.code != "INTERNAL":
        return err
    from rbee.config import API_VERSION, VERSION

    return RbeeError(
        "VERSION_MISMATCH",
        f"{client.what.capitalize()} at {client.address} does not know this request: it runs an older rbee than "
        f"this rbee-keeper ({VERSION}, API {API_VERSION})",
        {"address": client.address, "keeper_version": VERSION, "keeper_api_version": API_VERSION},
        [client.update_hint, "Or use a keeper of the release that daemon runs"],
    )


class DaemonClient:
    # What the daemon is called in messages ("the hive at HOST:PORT").
    what = "the daemon"
    # What to do when the daemon is of an older release (older_daemon).
    update_hint = "Update that daemon to this release and restart it"
    # The identity name (rbee/tls_identity.py) every daemon of this kind proves.
    identity: str | None = None

    def __init__(self, address: str, api_key: str, key_source: str, tls: bool | None = None, tls_name: str = "") -> None:
        self.address = address
        self.key_source = key_source
        # None: decided by the address (keeper_tls); True/False: as the queen or hive said.
        self._tls = keeper_tls(address, tls)
        # Over TLS the daemon proves who it is (the queen said which node's
        # hive or worker it is); without a name only its address is checked.
        if self._tls is not None and (tls_name or self.identity):
            self._tls = self._tls.for_peer(tls_name or self.identity)
        self._channel = open_channel(address, self._tls)
        # The key, and this keeper's release (rbee/client_version.py), on every call.
        self._md = (*metadata(api_key), *client_metadata())
        self._connected = False
        self.attempts = CONNECT_ATTEMPTS
        # Told about each retry (the keeper narrates it on stderr).
        self.on_retry: Callable[[str], None] | None = _narrate_retry
        self._bind(self._channel)

    def _bind(self, channel: grpc.aio.Channel) -> None:
        """Make the subclass's stubs on ``channel`` (again after a reconnect)."""

    async def __aenter__(self) -> Self:
        # Connected before any stub is used: a retry replaces the channel and
        # the stubs, so a call must not hold a stub of a channel given up on.
        try:
            await self.ensure_connected()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def ensure_connected(self, attempt_timeout: float = CONNECT_ATTEMPT_TIMEOUT_S) -> None:
        """Connect now (once per client): CONNECT_ATTEMPTS attempts, 200 and
        400 ms apart (jittered), else CONNECTION_TIMEOUT."""
        if self._connected:
            return
        delays = list(backoff_delays(CONNECT_BACKOFF_MS, self.attempts))
        reasons: list[str] = []
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                await self._channel.close(grace=None)
                self._channel = open_channel(self.address, self._tls)
                self._bind(self._channel)
            why = await connect_once(self._channel, attempt_timeout)
            if why is None:
                self._connected = True
                return
            reasons.append(why)
            if attempt < self.attempts:
                delay = delays[attempt - 1]
                if self.on_retry is not None:
                    self.on_retry(f"{self.address} did not answer ({why}); attempt {attempt + 1} of {self.attempts} in {delay * 1000:.0f} ms")
                await asyncio.sleep(delay)
        raise self.connection_timeout(reasons[-1])

    def connection_timeout(self, why: str) -> RbeeError:
        """A subclass names its daemon and how to start it."""
        return RbeeError(
            "CONNECTION_TIMEOUT",
            f"Cannot reach {self.what} at {self.address} after {self.attempts} attempts ({why})",
            {"address": self.address, "attempts": self.attempts, "last_error": why},
            [*self.unreachable_hints(), *self.tls_hints()],
        )

    def unreachable_hints(self) -> list[str]:
        return [f"Check that the daemon at {self.address} is running and the address is right"]

    def tls_hints(self) -> list[str]:
        """A refused connection can be TLS on one end and clear text on the other."""
        from rbee.hosts import is_loopback

        if self._tls is not None:
            return ["This client spoke mutual TLS: if the daemon runs with --insecure, set RBEE_TLS=off"]
        if not is_loopback(self.address.rpartition(":")[0]):
            return ["This client spoke clear text: if the daemon serves TLS, set RBEE_TLS=on"]
        return []

    def translate(self, err: RbeeError) -> RbeeError:
        """A subclass's chance to name its daemon in a transport failure."""
        return err

    def error(self, err: grpc.RpcError) -> RbeeError:
        """The RbeeError behind a failed call, with auth failures explained."""
        return explain_auth(self.translate(older_daemon(self, from_rpc_error(err, self.address))), self.address,
                            self.key_source)  # fmt: skip

    async def _unary(self, method: Any, request: Any, timeout: float | None = CALL_TIMEOUT_S) -> Any:
        try:
            return await method(request, metadata=self._md, timeout=timeout)
        except grpc.RpcError as err:
            raise self.error(err) from None

    async def _stream(self, method: Any, request: Any) -> AsyncIterator[Any]:
        """A server stream; failures as RbeeError; the call is cancelled when the reader stops."""
        call = method(request, metadata=self._md)
        try:
            async for item in call:
                yield item
        except grpc.RpcError as err:
            raise self.error(err) from None
        finally:
            call.cancel()
