"""AppKeyService: keys for applications on the queen's HTTP API (rbee_queen/appkeys.py).
The key itself leaves the queen once, in CreateAppKey's reply; the log and the
narration name keys by name only."""

from __future__ import annotations

import asyncio

import grpc

from rbee.enum_words import APP_KEY_SCOPES
from rbee.narration import Narrator
from rbee.rpc import handle_errors
from rbee.v1 import keys_pb2, keys_pb2_grpc

from rbee_queen.appkeys import AppKey, AppKeyStore


def _proto(key: AppKey) -> keys_pb2.AppKey:
    return keys_pb2.AppKey(name=key.name, key_scope=APP_KEY_SCOPES.number(str(key.scope)), created_at_unix_ms=key.created_at_unix * 1000,
                          last_used_unix_ms=key.last_used_unix * 1000)


class AppKeyServicer(keys_pb2_grpc.AppKeyServiceServicer):
    def __init__(self, store: AppKeyStore, log: Narrator) -> None:
        self._store = store
        self._log = log

    @handle_errors
    async def CreateAppKey(self, request: keys_pb2.CreateAppKeyRequest, context: grpc.aio.ServicerContext) -> keys_pb2.CreateAppKeyResponse:
        record, secret = await asyncio.to_thread(self._store.create, request.name, APP_KEY_SCOPES.word(request.key_scope))
        self._log("🔑", f"Application key {record.name!r} created (scope {record.scope})")
        return keys_pb2.CreateAppKeyResponse(key=_proto(record), secret=secret)

    @handle_errors
    async def ListAppKeys(self, request: keys_pb2.ListAppKeysRequest, context: grpc.aio.ServicerContext) -> keys_pb2.ListAppKeysResponse:
        return keys_pb2.ListAppKeysResponse(keys=[_proto(k) for k in await asyncio.to_thread(self._store.list)])

    @handle_errors
    async def RevokeAppKey(self, request: keys_pb2.RevokeAppKeyRequest, context: grpc.aio.ServicerContext) -> keys_pb2.RevokeAppKeyResponse:
        record = await asyncio.to_thread(self._store.revoke, request.name)
        self._log("🗑️", f"Application key {record.name!r} revoked: requests presenting it are refused from now on")
        return keys_pb2.RevokeAppKeyResponse(key=_proto(record))
