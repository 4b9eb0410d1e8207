"""`rbee-keeper keys create|list|revoke`: keys for applications on the queen's
HTTP API (the OpenAI routes, /metrics; docs/openai-api.md), kept by the queen
as digests (docs/security.md). The new key goes to stdout alone, so a script
can capture it; everything else goes to stderr."""

from __future__ import annotations

import typer

from rbee_keeper.common import QUEEN_OPTION, resolve_queen, run

keys_app = typer.Typer(
    help="Keys for applications (chat UIs, editors, openai clients) on the queen's OpenAI-compatible HTTP API.",
    no_args_is_help=True,
)

QUEEN_KEY_OPTION = typer.Option(
    None, "--api-key", metavar="KEY",
    help="The queen's key (or RBEE_QUEEN_API_KEY, \\[keeper] queen_api_key, or $RBEE_HOME/queen.key written by a local queen).",
)  # fmt: skip


def _scope(k) -> str:
    from rbee.enum_words import APP_KEY_SCOPES

    return APP_KEY_SCOPES.word(k.key_scope)


def _key_dict(k) -> dict:
    return {"name": k.name, "key_scope": _scope(k), "created_at_unix_ms": k.created_at_unix_ms,
            "last_used_unix_ms": k.last_used_unix_ms}  # fmt: skip


def parse_scope(scope: str) -> str:
    """--scope, checked here: the request carries the contract's enum, not the word."""
    from rbee.enum_words import APP_KEY_SCOPES
    from rbee_keeper.validation import invalid_argument

    if scope not in APP_KEY_SCOPES.words:
        raise invalid_argument("--scope", scope, "is 'inference' (the OpenAI routes and /metrics) or 'admin' (everything the HTTP API serves)",
                               "Pass --scope inference or --scope admin: `rbee-keeper keys create --name NAME --scope inference`")  # fmt: skip
    return scope


@keys_app.command("create")
def create_cmd(
    name: str = typer.Option(..., "--name", metavar="NAME", help="What the key is for: 1-64 letters, digits, '.', '_', '-'."),
    scope: str = typer.Option(
        "inference", "--scope", metavar="SCOPE",
        help="inference: the OpenAI routes and /metrics; admin: everything the HTTP API serves.",
    ),  # fmt: skip
    queen: str = QUEEN_OPTION,
    api_key: str = QUEEN_KEY_OPTION,
) -> None:
    """Make a new key and print it on stdout, this once: the queen keeps only its digest.

    Applications send it as `Authorization: Bearer KEY` (the openai clients' api_key).

    Example: rbee-keeper keys create --name webui

    In a script: KEY=$(rbee-keeper --quiet keys create --name grafana)
    """

    async def go() -> int:
        from rbee_keeper.queen_client import QueenClient
        from rbee_keeper.render import narrator

        wanted = parse_scope(scope)
        async with QueenClient.connect(resolve_queen(queen), api_key) as client:
            reply = await client.create_app_key(name, wanted)
        print(reply.secret, flush=True)
        say = narrator()
        say("🔑", f"Key {reply.key.name!r} created (scope {_scope(reply.key)}). It is shown this once: store it now.")
        say("👉", "Use it as `Authorization: Bearer KEY`, e.g. OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=KEY")
        return 0

    run(go())


@keys_app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="One JSON object per key: name, key_scope, created_at_unix_ms, last_used_unix_ms."),
    queen: str = QUEEN_OPTION,
    api_key: str = QUEEN_KEY_OPTION,
) -> None:
    """The keys for applications: name, scope, created, last used. Never the keys themselves.

    Example: rbee-keeper keys list --json
    """

    async def go() -> int:
        from rbee_keeper.listing import show_listing
        from rbee_keeper.queen_client import QueenClient
        from rbee_keeper.render import local_time

        async with QueenClient.connect(resolve_queen(queen), api_key) as client:
            keys = await client.list_app_keys()
        return show_listing(
            keys, as_json, _key_dict, "No keys for applications: make one with `rbee-keeper keys create --name NAME`",
            ("NAME", "SCOPE", "CREATED", "LAST USED"),
            lambda k: (k.name, _scope(k), local_time(k.created_at_unix_ms, seconds=True),
                       local_time(k.last_used_unix_ms, seconds=True, unset="never")),
        )  # fmt: skip

    run(go())


@keys_app.command("revoke")
def revoke_cmd(
    name: str = typer.Argument(..., metavar="NAME", help="The key's name, as `rbee-keeper keys list` shows it."),
    queen: str = QUEEN_OPTION,
    api_key: str = QUEEN_KEY_OPTION,
) -> None:
    """Revoke a key: the next request that presents it is refused (401).

    Example: rbee-keeper keys revoke webui
    """

    async def go() -> int:
        from rbee_keeper.queen_client import QueenClient
        from rbee_keeper.render import narrator

        async with QueenClient.connect(resolve_queen(queen), api_key) as client:
            key = await client.revoke_app_key(name)
        narrator()("🗑️", f"Key {key.name!r} (scope {_scope(key)}) revoked: applications presenting it are refused from now on")
        return 0

    run(go())


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
