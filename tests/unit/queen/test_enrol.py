"""Enrolment tokens (rbee_queen/enrol.py): one use, an expiry, the CA's fingerprint."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from rbee.errors import RbeeError
from rbee.tls import ClusterCA
from rbee_queen.enrol import EnrolTokens, ca_fingerprint, parse_token


def test_a_token_carries_the_cas_fingerprint_and_works_once(tmp_path: Path) -> None:
    ca = ClusterCA(tmp_path)
    tokens = EnrolTokens(ca)
    token = tokens.create(600)
    fingerprint, secret = parse_token(token)
    assert fingerprint == ca_fingerprint(ca.ca_pem())
    # Only the secret's digest is kept, owner-only.
    assert secret not in tokens.path.read_text()
    assert stat.S_IMODE(os.stat(tokens.path).st_mode) == 0o600
    assert tokens.consume(secret) and not tokens.consume(secret)
    assert not tokens.consume("another")


def test_expired_tokens_are_gone_and_bad_ones_named(tmp_path: Path) -> None:
    tokens = EnrolTokens(ClusterCA(tmp_path))
    secret = parse_token(tokens.create(600))[1]
    data = json.loads(tokens.path.read_text())
    tokens.path.write_text(json.dumps({k: 1.0 for k in data}))  # expired long ago
    assert not tokens.consume(secret)
    with pytest.raises(RbeeError) as err:
        tokens.create(5)
    assert err.value.code == "INVALID_ARGUMENT" and "--ttl" in err.value.suggestions[0]
    for bad in ("", "rbee1.x.y", "rbee2.AAAA.BBBB", "not a token"):
        with pytest.raises(RbeeError) as err:
            parse_token(bad)
        assert err.value.code == "ENROL_TOKEN_INVALID"


def test_a_wrong_secret_costs_no_write(tmp_path: Path) -> None:
    tokens = EnrolTokens(ClusterCA(tmp_path))
    secret = parse_token(tokens.create(600))[1]
    before = os.stat(tokens.path)
    for _ in range(5):
        assert not tokens.consume("guessed-" + "A" * 43)
    after = os.stat(tokens.path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert tokens.consume(secret)


async def test_a_keeper_name_with_a_line_break_is_refused(tmp_path: Path) -> None:
    import grpc
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from rbee.v1 import enrol_pb2
    from rbee_queen.enrol import EnrolServicer

    class Aborted(Exception):
        pass

    class Context:
        def peer(self) -> str:
            return "ipv4:127.0.0.1:1"

        async def abort_with_status(self, status: grpc.Status) -> None:
            raise Aborted(status.details)

    lines: list[str] = []
    servicer = EnrolServicer(ClusterCA(tmp_path), lambda _e, text, *a: lines.append(text))
    secret = parse_token(servicer.tokens.create(600))[1]
    public = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    with pytest.raises(Aborted, match="name"):
        await servicer.Join(enrol_pb2.JoinRequest(name="laptop\n", secret=secret, public_key_pem=public), Context())
    assert lines == []
    reply = await servicer.Join(enrol_pb2.JoinRequest(name="laptop", secret=secret, public_key_pem=public), Context())
    assert reply.certificate_pem and "\n" not in lines[-1]
