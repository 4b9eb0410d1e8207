"""Bearer keys on the HTTP routes: ``Authorization: Bearer KEY``.

The queen's own key is the admin scope and opens every route. Keys made for
applications are checked by a verifier the queen plugs in
(``Authenticator.verifier``: token → its scope, or None for an unknown or
revoked key). A missing or unknown key is 401, a key whose scope does not
open the route is 403, both in OpenAI's error shape. Keys are compared in
constant time and never logged."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

from fastapi import Request

from rbee.scopes import Scope
from rbee_queen.http.errors import ApiError

Verifier = Callable[[str], "str | None"]
# A key longer than this is not one of ours (and is not hashed or compared).
MAX_KEY_CHARS = 512


class Authenticator:
    def __init__(self, admin_key: str, verifier: Verifier | None = None) -> None:
        # Digests of equal length: compare_digest on the keys themselves says the admin key's length.
        self._admin = hashlib.sha256(admin_key.encode()).digest()
        self.verifier = verifier

    def scope_of(self, token: str) -> str | None:
        if not token or len(token) > MAX_KEY_CHARS:
            return None
        if hmac.compare_digest(hashlib.sha256(token.encode("utf-8", "replace")).digest(), self._admin):
            return Scope.ADMIN.value
        if self.verifier is not None:
            scope = self.verifier(token)
            return str(scope) if scope else None
        return None

    def check(self, request: Request, scope: str) -> str:
        """The scope of the request's key, when it opens ``scope``; else 401/403."""
        header = request.headers.get("authorization", "")
        kind, _, token = header.partition(" ")
        if not header:
            raise ApiError(401, "No API key: send it as `Authorization: Bearer KEY` (make one with "
                           "`rbee-keeper keys create --name NAME`)", None, "missing_api_key")  # fmt: skip
        if kind.lower() != "bearer" or not token.strip():
            raise ApiError(401, "The Authorization header must be `Bearer KEY`", None, "invalid_api_key")
        have = self.scope_of(token.strip())
        if have is None:
            raise ApiError(401, "Incorrect API key provided (unknown or revoked)", None, "invalid_api_key")
        if have != Scope.ADMIN.value and have != scope:
            raise ApiError(403, f"This key has the {have} scope; this route needs {scope}", None, "wrong_key_scope")
        return have


def require(scope: str) -> Callable[[Request], Any]:
    """A route dependency: the request's key must open ``scope``."""

    async def dependency(request: Request) -> str:
        return request.app.state.auth.check(request, scope)

    return dependency


inference_key = require(Scope.INFERENCE.value)
admin_key = require(Scope.ADMIN.value)
