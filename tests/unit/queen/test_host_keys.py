"""The host key decision (pure) and the known_hosts reading and writing around it."""

from __future__ import annotations

import stat
from pathlib import Path

import asyncssh
import pytest

from rbee.errors import RbeeError
from rbee_queen.nodes.host_keys import (
    HostKey,
    HostKeyVerdict,
    RecordedHostKey,
    append_known_host,
    decide_host_key,
    known_hosts_line,
    known_hosts_name,
    read_recorded_host_keys,
)


def new_key(alg: str = "ssh-ed25519") -> HostKey:
    return HostKey.from_asyncssh(asyncssh.generate_private_key(alg).convert_to_public())


@pytest.fixture(scope="module")
def keys() -> dict[str, HostKey]:
    return {"a": new_key(), "b": new_key(), "ecdsa": new_key("ecdsa-sha2-nistp256")}


FILE1 = Path("/known/one")
FILE2 = Path("/known/two")


def test_fingerprint_is_openssh_sha256_form() -> None:
    key = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    ours = HostKey.from_asyncssh(key)
    assert ours.fingerprint == key.get_fingerprint("sha256")
    assert ours.fingerprint.startswith("SHA256:") and not ours.fingerprint.endswith("=")
    assert HostKey.from_openssh(key.export_public_key().decode()) == ours
    assert ours.openssh().split()[0] == "ssh-ed25519"


def test_nothing_recorded_is_unknown(keys: dict[str, HostKey]) -> None:
    d = decide_host_key(keys["a"], [])
    assert d.verdict is HostKeyVerdict.UNKNOWN and not d.accepted and d.recorded is None


def test_nothing_recorded_and_trusted_is_accepted_to_record(keys: dict[str, HostKey]) -> None:
    d = decide_host_key(keys["a"], [], trust_new=True)
    assert d.verdict is HostKeyVerdict.TRUST_NEW and d.accepted


def test_matching_entry_in_any_file_is_known(keys: dict[str, HostKey]) -> None:
    recorded = [RecordedHostKey(keys["ecdsa"], FILE1), RecordedHostKey(keys["a"], FILE2)]
    for trust in (False, True):
        d = decide_host_key(keys["a"], recorded, trust_new=trust)
        assert d.verdict is HostKeyVerdict.KNOWN and d.accepted
        assert d.recorded == RecordedHostKey(keys["a"], FILE2)


def test_other_key_recorded_is_changed_even_when_trusting(keys: dict[str, HostKey]) -> None:
    recorded = [RecordedHostKey(keys["a"], FILE1)]
    for trust in (False, True):
        d = decide_host_key(keys["b"], recorded, trust_new=trust)
        assert d.verdict is HostKeyVerdict.CHANGED and not d.accepted
        assert d.recorded == RecordedHostKey(keys["a"], FILE1)
        assert d.presented == keys["b"]


def test_changed_reports_the_entry_of_the_same_algorithm(keys: dict[str, HostKey]) -> None:
    recorded = [RecordedHostKey(keys["ecdsa"], FILE1), RecordedHostKey(keys["a"], FILE2)]
    d = decide_host_key(keys["b"], recorded, trust_new=True)
    assert d.verdict is HostKeyVerdict.CHANGED and d.recorded == RecordedHostKey(keys["a"], FILE2)


def test_revoked_key_is_refused(keys: dict[str, HostKey]) -> None:
    d = decide_host_key(keys["a"], [RecordedHostKey(keys["a"], FILE1)], trust_new=True,
                        revoked=[RecordedHostKey(keys["a"], FILE2)])
    assert d.verdict is HostKeyVerdict.REVOKED and not d.accepted and d.recorded.file == FILE2


def test_names_and_lines(keys: dict[str, HostKey]) -> None:
    assert known_hosts_name("node.lan", 22) == "node.lan"
    assert known_hosts_name("127.0.0.1", 2222) == "[127.0.0.1]:2222"
    assert known_hosts_line("127.0.0.1", 2222, keys["a"]) == f"[127.0.0.1]:2222 {keys['a'].openssh()}"


def test_reading_matches_host_and_port_exactly(tmp_path: Path, keys: dict[str, HostKey]) -> None:
    one, two, missing = tmp_path / "one", tmp_path / "two", tmp_path / "missing"
    one.write_text(
        "# comment\n"
        f"node.lan {keys['b'].openssh()}\n"  # port 22 only
        f"[node.lan]:2222 {keys['a'].openssh()}\n"
        f"[other.lan]:2222 {keys['b'].openssh()}\n"
    )
    two.write_text(f"[node.lan]:2222,[10.0.0.5]:2222 {keys['ecdsa'].openssh()} some comment\n")
    recorded, revoked = read_recorded_host_keys([one, missing, two], "node.lan", 2222)
    assert recorded == [RecordedHostKey(keys["a"], one), RecordedHostKey(keys["ecdsa"], two)]
    assert revoked == []
    # No fallback from [host]:port to a bare host entry (that one is for port 22).
    assert read_recorded_host_keys([one], "node.lan", 22)[0] == [RecordedHostKey(keys["b"], one)]
    assert read_recorded_host_keys([one], "node.lan", 2200) == ([], [])


def test_reading_understands_hashed_names_and_revoked(tmp_path: Path, keys: dict[str, HostKey]) -> None:
    import base64
    import hashlib
    import hmac

    salt = b"0123456789abcdefghij"
    digest = hmac.new(salt, b"[node.lan]:2222", hashlib.sha1).digest()
    hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
    path = tmp_path / "known_hosts"
    path.write_text(f"{hashed} {keys['a'].openssh()}\n@revoked [node.lan]:2222 {keys['b'].openssh()}\n")
    recorded, revoked = read_recorded_host_keys([path], "node.lan", 2222)
    assert recorded == [RecordedHostKey(keys["a"], path)]
    assert revoked == [RecordedHostKey(keys["b"], path)]


def test_unreadable_known_hosts_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(RbeeError) as err:
        read_recorded_host_keys([folder], "node.lan", 22)
    assert err.value.code == "SSH_HOST_KEY_UNKNOWN"
    assert str(folder) in err.value.message


def test_append_creates_private_file_and_folder(tmp_path: Path, keys: dict[str, HostKey]) -> None:
    path = tmp_path / "home" / "known_hosts"
    append_known_host(path, known_hosts_line("n", 2222, keys["a"]))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # A file without a final newline gets one before the next line.
    with path.open("a") as fh:
        fh.write("# no newline")
    append_known_host(path, known_hosts_line("m", 22, keys["b"]))
    assert path.read_text().splitlines() == [
        f"[n]:2222 {keys['a'].openssh()}", "# no newline", f"m {keys['b'].openssh()}",
    ]
