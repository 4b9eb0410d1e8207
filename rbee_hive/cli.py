"""rbee-hive: the pool manager daemon of one node, and its local tools."""

from __future__ import annotations

from rbee.cli_common import make_app, run_app

from rbee_hive.commands import daemon, models

app = make_app("rbee-hive", "The node's pool manager: detects what the node has, checks resources, runs workers.")
daemon.register(app)
models.register(app)


def main() -> None:
    run_app(app, "rbee-hive")


if __name__ == "__main__":
    main()
