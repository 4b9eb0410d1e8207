"""Every `rbee-keeper …` command any program suggests to a user is one the
real CLI accepts: the command exists, each option is known, each required
option is there, each value has the right type. The commands are collected
from the string literals of every package (rbee, rbee_keeper, rbee_queen,
rbee_hive, rbee_worker; f-strings included; hints, help texts, examples),
placeholders filled with sample values, and parsed by the keeper's click
command without running anything."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import typer.main

from rbee_keeper.cli import app

try:  # recent typer carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import UsageError

REPO = Path(__file__).resolve().parents[3]
PACKAGES = ("rbee", "rbee_keeper", "rbee_queen", "rbee_hive", "rbee_worker")
# `rbee-keeper` followed by its words, up to what ends a command in prose: a
# backtick, a bracket, a comma or semicolon, a line end, " / ", " or ", " then ".
COMMAND = re.compile(r"rbee-keeper ((?:(?! / | or | then | and )[^`()\n,;])+)")
# "rbee-keeper finds it": the program named in a sentence, not a command.
PROSE = {"finds", "looks", "starts", "saves", "prints", "checks", "is", "talks", "waits", "reads", "command", "commands",
         "reaches", "sends", "on", "clones", "asks", "gets", "runs", "uses", "validates", "receives", "exits", "keeps", "stops", "calls"}  # fmt: skip
SAMPLES = {
    "NAME": "node1",
    "URL": "https://example.org/rbee.git",
    "KEY": "/home/me/.ssh/id_ed25519",
    "HOST": "192.0.2.10",
    "PATH": "/opt/rbee",
    "USER": "me",
    "BRANCH": "main",
    "PORT": "2222",
    "ID": "worker-1",
    "MODEL": "hf:org/repo",
    "NODE": "node1",
    "REF": "hf:org/repo",
    "ADDRESS": "127.0.0.1:7910",
    "HOST:PORT": "127.0.0.1:7900",
    "N": "1",
}
HOLE = "\0"


def _literal_text(node: ast.AST) -> str | None:
    """A string literal's text; an f-string's parts with HOLE<expression>HOLE for each value."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for part in node.values:
            if isinstance(part, ast.Constant):
                parts.append(str(part.value))
            else:
                parts.append(f"{HOLE}{ast.unparse(part.value)}{HOLE}")  # type: ignore[attr-defined]
        return "".join(parts)
    return None


def _sample_for(expression: str) -> str:
    """A value for an f-string hole, from what the expression names."""
    low = expression.lower()
    if "address" in low:
        return "127.0.0.1:7900"
    if "ref" in low or "model" in low:
        return SAMPLES["MODEL"]
    if "port" in low:
        return "2222"
    if "url" in low or "repo" in low:
        return SAMPLES["URL"]
    if "path" in low:
        return SAMPLES["PATH"]
    return "node1"


def suggested_commands() -> list[tuple[str, str]]:
    """(where, the command's words after `rbee-keeper`) for every suggestion in the packages."""
    found = []
    for package in PACKAGES:
        for source in sorted((REPO / package).rglob("*.py")):
            if "v1" in source.relative_to(REPO).parts:  # generated stubs
                continue
            tree = ast.parse(source.read_text(), str(source))
            # An f-string's literal parts are Constants too: read them as part of the whole.
            parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
            for node in ast.walk(tree):
                if not isinstance(node, (ast.JoinedStr, ast.Constant)) or id(node) in parts:
                    continue
                text = _literal_text(node)
                if not text or "rbee-keeper " not in text:
                    continue
                for match in COMMAND.finditer(text):
                    command = re.sub(f"{HOLE}([^{HOLE}]*){HOLE}", lambda m: _sample_for(m.group(1)), match.group(1))
                    command = command.strip().rstrip(".:").strip()
                    first = command.split(" ")[0] if command else ""
                    # Synopses ("workers list|health") and sentences are not suggestions.
                    if not first or first in PROSE or "|" in command or not re.match(r"^[a-z-]+$", first):
                        continue
                    where = f"{source.relative_to(REPO)}:{node.lineno}"
                    found.append((where, command))
    return sorted(set(found))


DOCS = ("README.md", "docs")
# A shell line running the keeper: an optional .venv/bin/ and VAR=value words first.
DOC_LINE = re.compile(r"^\s*(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?rbee-keeper\s+(.*)$")


def documented_commands() -> list[tuple[str, str]]:
    """(where, words after `rbee-keeper`) for every keeper command in the README
    and docs/: the lines of shell blocks (continuations joined, comments cut)
    and commands in backticks."""
    found = []
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for path in files:
        text = path.read_text()
        in_block = False
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            number = i + 1
            if line.lstrip().startswith("```"):
                in_block = not in_block
            elif in_block:
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                line = re.sub(r"\s+#\s.*$", "", line)
                match = DOC_LINE.match(line)
                if match and match.group(1).strip():
                    found.append((f"{path.relative_to(REPO)}:{number}", match.group(1).strip().rstrip("&").strip()))
            else:
                for m in re.finditer(r"`rbee-keeper ([^`]+)`", line):
                    found.append((f"{path.relative_to(REPO)}:{number}", m.group(1)))
            i += 1
    return sorted(set(c for c in found if "|" not in c[1]))


ELIDED = ("...", "…")


def _fill(command: str) -> list[str]:
    command = command.replace('"..."', "text").replace('"…"', "text")
    words = [w for w in shlex.split(command) if w not in ELIDED]
    return [SAMPLES.get(w, w) for w in words]


def parse(words: list[str], elided: bool = False):
    """Parse ``rbee-keeper WORDS`` down to the leaf command, as the CLI would,
    without invoking it. Raises click's UsageError subclasses on a mistake.
    ``elided``: the words stand for a longer command (`add-node ... --x`),
    so required options left out are filled with a sample value."""
    command = typer.main.get_command(app)
    name, parent, args = "rbee-keeper", None, list(words)
    while True:
        leaf = not getattr(command, "commands", None)
        if leaf and elided:
            for param in command.params:
                is_option = any(o.startswith("-") for o in param.opts)
                if is_option and getattr(param, "required", False) and not set(param.opts) & set(args):
                    args += [param.opts[0], "node1"]
        ctx = command.make_context(name, args, parent=parent)
        if leaf:
            return ctx
        rest = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        name, command, args = command.resolve_command(ctx, rest)
        assert command is not None, f"no command {name!r}"
        parent = ctx


SUGGESTED = suggested_commands()
DOCUMENTED = documented_commands()


def test_the_programs_suggest_keeper_commands() -> None:
    commands = {" ".join(c.split(" --")[0].split()[:2]) for _, c in SUGGESTED}
    assert {"setup install", "setup add-node", "setup update-node", "setup remove-node", "setup check-node",
            "setup list-nodes", "models rm", "models download", "workers shutdown", "logs"} <= commands, commands  # fmt: skip
    assert ("rbee_hive/workers/manager.py:324", "logs --node NODE") in SUGGESTED or any(c.startswith("logs --node") for _, c in SUGGESTED)
    assert {w.split("/")[0] for w, _ in SUGGESTED} >= {"rbee_queen", "rbee_hive", "rbee_keeper"}


def test_the_docs_show_keeper_commands() -> None:
    assert any(w.startswith("README.md") for w, _ in DOCUMENTED) and any(w.startswith("docs/") for w, _ in DOCUMENTED)


@pytest.mark.parametrize(("where", "command"), SUGGESTED + DOCUMENTED, ids=[f"{w} {c}" for w, c in SUGGESTED + DOCUMENTED])
def test_a_suggested_command_parses_with_the_real_cli(where: str, command: str) -> None:
    words = _fill(command.replace("[", "").replace("]", ""))  # optional parts: check them too
    root = typer.main.get_command(app)
    while words and words[0].startswith("-"):  # root options (--quiet, --install-completion): looked up only
        assert words[0] == "--help" or any(words[0] in p.opts for p in root.params), f"{where}: rbee-keeper has no option {words[0]}"
        words = words[1:]
    if not words:
        return
    try:
        ctx = parse(words, elided=any(mark in command.split() for mark in ELIDED))
    except UsageError as exc:
        pytest.fail(f"{where}: `rbee-keeper {command}` does not parse: {type(exc).__name__}: {exc.format_message()}")
    assert ctx.command.callback is not None
    assert not ctx.args, f"{where}: `rbee-keeper {command}` leaves {ctx.args} unparsed"


@pytest.mark.parametrize(
    "words",
    [
        ["setup", "install", "--node", "n1", "--no-such-option"],
        ["setup", "remove-node"],  # --name is required
        ["setup", "add-node", "--name", "n1", "--ssh-port", "not-a-port"],
        ["setup", "no-such-command"],
    ],
)
def test_the_parser_catches_the_mistakes_a_stale_suggestion_would_have(words: list[str]) -> None:
    with pytest.raises(UsageError):
        parse(words)
