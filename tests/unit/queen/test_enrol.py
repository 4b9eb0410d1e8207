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
