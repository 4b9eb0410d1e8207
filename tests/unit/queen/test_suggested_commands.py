"""Every `rbee-keeper …` command the queen suggests to a user is one the real
CLI accepts: the command exists, each option is known, each required option
is there, each value has the right type. The commands are collected from the
string literals of the rbee_queen package (f-strings included), placeholders
filled with sample values, and parsed by the keeper's click command without
running anything."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import typer.main

import rbee_queen
from rbee_keeper.cli import app

try:  # recent typer carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import UsageError

PACKAGE = Path(rbee_queen.__file__).parent
# A command in backticks, or after "e.g." up to the closing parenthesis.
COMMAND = re.compile(r"`rbee-keeper ([^`]+)`|e\.g\. rbee-keeper ([^)`]+)\)")
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
    if "port" in low:
        return "2222"
    if "url" in low or "repo" in low:
        return SAMPLES["URL"]
    if "path" in low:
        return SAMPLES["PATH"]
    return "node1"


def suggested_commands() -> list[tuple[str, str]]:
    """(where, the command's words after `rbee-keeper`) for every suggestion in rbee_queen."""
    found = []
    for source in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(source.read_text(), str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                pass
            elif not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            text = _literal_text(node)
            if not text or "rbee-keeper " not in text:
                continue
            for match in COMMAND.finditer(text):
                command = match.group(1) or match.group(2)
                command = re.sub(f"{HOLE}([^{HOLE}]*){HOLE}", lambda m: _sample_for(m.group(1)), command)
                where = f"{source.relative_to(PACKAGE.parent)}:{node.lineno}"
                found.append((where, command))
    # f-string parts are Constants too: keep one entry per place and command.
    return sorted(set(found))


ELIDED = ("...", "…")


def _fill(command: str) -> list[str]:
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
                if getattr(param, "required", False) and not set(param.opts) & set(args):
                    args += [param.opts[0], "node1"]
        ctx = command.make_context(name, args, parent=parent)
        if leaf:
            return ctx
        rest = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        name, command, args = command.resolve_command(ctx, rest)
        assert command is not None, f"no command {name!r}"
        parent = ctx


SUGGESTED = suggested_commands()


def test_the_queen_suggests_keeper_commands() -> None:
    commands = {c.split(" --")[0] for _, c in SUGGESTED}
    assert {"setup install", "setup add-node", "setup update-node", "setup remove-node", "setup check-node",
            "setup list-nodes"} <= commands, commands  # fmt: skip


@pytest.mark.parametrize(("where", "command"), SUGGESTED, ids=[f"{w} {c}" for w, c in SUGGESTED])
def test_a_suggested_command_parses_with_the_real_cli(where: str, command: str) -> None:
    words = _fill(command)
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
