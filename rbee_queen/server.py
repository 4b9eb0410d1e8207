"""queen-rbee: the orchestrator (node registry, SSH, scheduling across hives).

Not built yet: the program exists so that the console script answers with a
clear error instead of failing to import. Workers and hives are usable
directly (`rbee-keeper infer --worker`, `rbee-keeper workers|models --hive`)."""

from __future__ import annotations

import typer

from rbee.cli_common import fail, make_app, run_app
from rbee.errors import RbeeError

ACTOR = "queen-rbee"

app = make_app(ACTOR, "The orchestrator of rbee's nodes (not built yet in this release).")


@app.command()
def daemon(
    port: int = typer.Option(None, "--port", help="Port of the gRPC server."),
    api_key: str = typer.Option(None, "--api-key", help="API key clients must present."),
) -> None:
    """Run the queen (not built yet: says so and exits 1)."""
    fail(
        RbeeError(
            "NOT_IMPLEMENTED",
            "queen-rbee is not built yet: there is no node registry, SSH or scheduling in this release",
            {"program": ACTOR},
            [
                "Run a hive on the node (rbee-hive daemon) and use rbee-keeper workers|models --hive HOST:PORT",
                "Or start a worker (llm-worker-rbee --model PATH ...) and use rbee-keeper infer --worker HOST:PORT",
            ],
        ),
        ACTOR,
    )


def main() -> None:
    run_app(app, ACTOR)


if __name__ == "__main__":
    main()
