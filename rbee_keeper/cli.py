"""rbee-keeper: the command line for users and operators."""

from __future__ import annotations

from rbee.cli_common import make_app, run_app

from rbee_keeper.commands import infer, logs, models, setup, workers

app = make_app("rbee-keeper", "Run LLMs across the machines of your home lab: stream tokens from a model on any node.")
infer.register(app)
workers.register(app)
models.register(app)
logs.register(app)
setup.register(app)


def main() -> None:
    run_app(app, "rbee-keeper")


if __name__ == "__main__":
    main()
