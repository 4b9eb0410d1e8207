"""The contracts' breaking-change check (scripts/protos_breaking.py): real
.proto files compiled by grpc_tools.protoc, before and after a change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.common import REPO

sys.path.insert(0, str(REPO / "scripts"))
from protos_breaking import BASELINE, breaking_changes, descriptor_set, summary  # noqa: E402

BEFORE = """
syntax = "proto3";
package demo.v1;
enum Colour { COLOUR_UNSPECIFIED = 0; COLOUR_RED = 1; }
message Ask { string prompt = 1; int32 max_tokens = 2; oneof choice { string a = 3; string b = 4; } }
message Answer { repeated string tokens = 1; Colour colour = 2; }
service Demo { rpc Run(Ask) returns (stream Answer); rpc Stop(Ask) returns (Answer); }
"""


def shape(tmp_path: Path, name: str, text: str) -> dict:
    folder = tmp_path / name / "demo" / "v1"
    folder.mkdir(parents=True)
    (folder / "demo.proto").write_text(text)
    return summary(descriptor_set(tmp_path / name))


def test_additions_are_not_breaking(tmp_path: Path) -> None:
    after = BEFORE.replace("int32 max_tokens = 2;", "int32 max_tokens = 2; double temperature = 5;")
    after = after.replace("COLOUR_RED = 1;", "COLOUR_RED = 1; COLOUR_BLUE = 2;")
    after = after.replace("rpc Stop(Ask) returns (Answer);", "rpc Stop(Ask) returns (Answer); rpc Peek(Ask) returns (Answer);")
    after += "message Extra { string note = 1; }\n"
    assert breaking_changes(shape(tmp_path, "a", BEFORE), shape(tmp_path, "b", after)) == []


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("int32 max_tokens = 2;", ""), "Ask: field max_tokens = 2 was removed without reserving 2"),
        (("int32 max_tokens = 2;", "int64 max_tokens = 2;"), "Ask: field 2 changed its type from 'TYPE_INT32' to 'TYPE_INT64'"),
        (("int32 max_tokens = 2;", "int32 max_tokens = 9;"), "Ask: field max_tokens = 2 was removed"),
        (("int32 max_tokens = 2;", "int32 limit = 2;"), "Ask: field 2 changed its name from 'max_tokens' to 'limit'"),
        (("repeated string tokens = 1;", "string tokens = 1;"), "Answer: field 1 changed its label"),
        (("COLOUR_RED = 1;", ""), "enum demo.v1.Colour: value 1 (COLOUR_RED) was removed or renamed"),
        (("rpc Stop(Ask) returns (Answer);", ""), "rpc demo.v1.Demo.Stop was removed"),
        (("returns (stream Answer)", "returns (Answer)"), "rpc demo.v1.Demo.Run changed its server_streaming"),
        (("string a = 3;", ""), "Ask: field a = 3 was removed"),
    ],
)
def test_each_breaking_change_is_named(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    problems = breaking_changes(shape(tmp_path, "a", BEFORE), shape(tmp_path, "b", BEFORE.replace(*edit)))
    assert any(expected in p for p in problems), problems


def test_a_removed_field_whose_number_is_reserved_is_allowed(tmp_path: Path) -> None:
    after = BEFORE.replace("int32 max_tokens = 2;", "reserved 2;")
    assert breaking_changes(shape(tmp_path, "a", BEFORE), shape(tmp_path, "b", after)) == []


def test_the_committed_contracts_keep_the_baseline() -> None:
    """What `make protos-check` runs: protos/ against protos/baseline.json."""
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "protos_breaking.py"), "check"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert json.loads(BASELINE.read_text())["services"]


def test_a_break_against_the_last_release_tag_is_found_in_git(tmp_path: Path) -> None:
    """`check` also compares protos/ with the protos of the newest v* tag."""
    from protos_breaking import last_release_tag, protos_at

    repo = tmp_path / "repo"
    folder = repo / "protos" / "demo" / "v1"
    folder.mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@127.0.0.1"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    assert last_release_tag(repo) is None
    (folder / "demo.proto").write_text(BEFORE)
    subprocess.run([*git, "add", "protos"], check=True)
    subprocess.run([*git, "commit", "-qm", "contracts"], check=True)
    subprocess.run([*git, "tag", "v0.1.0"], check=True)
    (folder / "demo.proto").write_text(BEFORE.replace("int32 max_tokens = 2;", "int32 limit = 2;"))
    subprocess.run([*git, "commit", "-qam", "a rename"], check=True)
    assert last_release_tag(repo) == "v0.1.0"
    released = summary(descriptor_set(protos_at("v0.1.0", tmp_path / "scratch", repo)))
    problems = breaking_changes(released, summary(descriptor_set(repo / "protos")))
    assert any("changed its name from 'max_tokens' to 'limit'" in p for p in problems), problems
    with pytest.raises(SystemExit, match="no such git revision"):
        protos_at("v9.9.9", tmp_path / "other", repo)
