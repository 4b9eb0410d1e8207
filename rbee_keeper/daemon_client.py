"""What keeper's clients of a daemon (a worker, a hive) share: one channel,
the API key on every call, and failures turned into RbeeError that name the
daemon and where the key came from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Self

import grpc

from rbee.channel import metadata, open_channel
from rbee.errors import RbeeError, from_rpc_error

from rbee_keeper.common import explain_auth

CALL_TIMEOUT_S = 30.0


class DaemonClient:
    def __init__(self, address: str, api_key: str, key_source: str) -> None:
        self.address = address
        self.key_source = key_source
        self._channel = open_channel(address)
        self._md = metadata(api_key)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(grace=None)

    def translate(self, err: RbeeError) -> RbeeError:
        """A subclass's chance to name its daemon in a transport failure."""
        return err

    def error(self, err: grpc.RpcError) -> RbeeError:
        """The RbeeError behind a failed call, with auth failures explained."""
        return explain_auth(self.translate(from_rpc_error(err, self.address)), self.address, self.key_source)

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
