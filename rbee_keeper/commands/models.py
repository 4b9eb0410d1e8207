"""`rbee-keeper models list|download|rm`: a hive's model catalog.

The model reference is checked before anything is sent. Download progress is
a bar on stderr (percent, size, speed) on a terminal and a line per second
otherwise; narration goes to stderr too; the model's local path, the one
result, to stdout.
"""

from __future__ import annotations

import sys
import time

import typer
from rich import filesize
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from rbee.enum_words import MODEL_FORMATS
from rbee.errors import RbeeError
from rbee.modelref import parse_model_ref
from rbee.narration import format_line, stage_of
from rbee.v1 import common_pb2, provisioning_pb2
from rbee_keeper.output import quiet as _quiet
from rbee_keeper.common import ACTOR, HIVE_KEY_OPTION, HIVE_OPTION, NODE_OPTION, QUEEN_OPTION, hive_for, run
from rbee_keeper.hive_client import HiveClient
from rbee_keeper.render import local_time, narrator
from rbee_keeper.validation import invalid_argument, validate_backend

PROVIDERS = ("hf", "file")
LINE_INTERVAL_S = 1.0

models_app = typer.Typer(help="A hive's model catalog: list, download (with progress), remove.", no_args_is_help=True)


class DownloadView:
    """Progress of a download: a live bar on a terminal, else a line at most
    once a second (and at the end), so logs and pipes stay readable."""

    def __init__(self, model: str, console: Console | None = None) -> None:
        self.model = model
        self.console = console if console is not None else Console(stderr=True, highlight=False, quiet=_quiet())
        self.narrate = narrator(sys.stderr)
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._last_line = 0.0
        self._last_stage = ""

    @staticmethod
    def figures(p: common_pb2.ProgressEvent) -> str:
        size = f"{filesize.decimal(p.done)} / {filesize.decimal(p.total)}" if p.total else filesize.decimal(p.done)
        percent = f"{100.0 * p.done / p.total:5.1f}% " if p.total else ""
        return f"{percent}{size} · {filesize.decimal(int(p.rate))}/s"

    def narration(self, ev: common_pb2.NarrationEvent) -> None:
        if self._bar is not None:
            self._bar.console.print(format_line(ev), markup=False, highlight=False)
        else:
            self.narrate.emit(ev)

    def progress(self, p: common_pb2.ProgressEvent) -> None:
        if self.console.is_terminal:
            self._update_bar(p)
            return
        now = time.monotonic()
        complete = p.total and p.done >= p.total
        stage = stage_of(p)
        if now - self._last_line >= LINE_INTERVAL_S or stage != self._last_stage or complete:
            self._last_line = now
            self._last_stage = stage
            what = f" {p.message}" if p.message and p.message != "complete" else ""
            self.narrate("⏬", f"{stage or 'download'}{what}: {self.figures(p)}")

    def _update_bar(self, p: common_pb2.ProgressEvent) -> None:
        if self._bar is None:
            self._bar = Progress(
                TextColumn(f"[{ACTOR}] ⏬ {self.model}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[size]}"),
                TextColumn("{task.fields[speed]}"),
                TextColumn("{task.description}"),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("", total=None, size="", speed="")
        assert self._task is not None
        size = f"{filesize.decimal(p.done)}/{filesize.decimal(p.total)}" if p.total else filesize.decimal(p.done)
        self._bar.update(
            self._task,
            completed=p.done,
            total=p.total or None,
            size=size,
            speed=f"{filesize.decimal(int(p.rate))}/s",
            description=p.message if p.message != "complete" else "",
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


async def _download(client: HiveClient, model: str, backend: str | None) -> int:
    view = DownloadView(model)
    entry: provisioning_pb2.ModelEntry | None = None
    try:
        async for msg in client.download_model(model, backend or ""):
            if msg.HasField("model"):
                entry = msg.model
            elif msg.event.HasField("narration"):
                view.narration(msg.event.narration)
            elif msg.event.HasField("progress"):
                view.progress(msg.event.progress)
    finally:
        view.close()
    if entry is None:
        raise RbeeError(
            "STREAM_BROKEN",
            f"{client.address} ended the download of {model} without a result",
            {"hive": client.address, "model": model},
            ["Run the download again; it resumes where it stopped"],
        )
    path = entry.loadable_path or entry.local_path
    view.narrate("✅", f"{entry.model_ref} on {client.address}: {filesize.decimal(entry.size_bytes)}, {MODEL_FORMATS.word(entry.weights_format)}, {path}")
    typer.echo(path)
    return 0


def model_dict(m: provisioning_pb2.ModelEntry) -> dict:
    return {
        "model_ref": m.model_ref,
        "weights_format": MODEL_FORMATS.word(m.weights_format),
        "size_bytes": m.size_bytes,
        "downloaded_at_unix_ms": m.downloaded_at_unix_ms,
        "local_path": m.local_path,
    }


async def _list(client: HiveClient, provider: str | None, as_json: bool = False) -> int:
    models = await client.list_models(provider or "")
    if as_json:
        import json

        for m in models:
            print(json.dumps(model_dict(m)))
        return 0
    if not models:
        narrator(sys.stderr)("📭", f"No models on {client.address}" + (f" from provider {provider}" if provider else ""))
        return 0
    rows = [("MODEL", "FORMAT", "SIZE", "DOWNLOADED", "PATH")]
    for m in models:
        when = local_time(m.downloaded_at_unix_ms)
        rows.append((m.model_ref, MODEL_FORMATS.word(m.weights_format), filesize.decimal(m.size_bytes), when, m.local_path))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


async def _remove(client: HiveClient, model: str) -> int:
    reply = await client.remove_model(model)
    narrator(sys.stderr)(
        "🗑️", f"Removed {reply.removed.model_ref} from {client.address} ({filesize.decimal(reply.removed.size_bytes)} freed)"
    )
    return 0


@models_app.command("download")
def download(
    model: str = typer.Argument(..., metavar="MODEL", help="hf:ORG/REPO\\[/FILE]\\[@REVISION] or file:///abs/path"),
    node: str = NODE_OPTION,
    hive: str = HIVE_OPTION,
    queen: str = QUEEN_OPTION,
    backend: str = typer.Option(None, "--backend", help="Prepare the model for this backend's engine (imports GGUF for cpu)."),
    api_key: str = HIVE_KEY_OPTION,
) -> None:
    """Download a model onto a node (progress on stderr, its path there on stdout).

    Example: rbee-keeper models download hf:HuggingFaceTB/SmolLM2-135M-Instruct --node workstation
    """

    async def main() -> int:
        parse_model_ref(model)
        chosen = validate_backend(backend)
        async with await hive_for(hive, node, api_key, queen) as client:
            return await _download(client, model, chosen)

    run(main())


@models_app.command("list")
def list_models(
    node: str = NODE_OPTION,
    hive: str = HIVE_OPTION,
    queen: str = QUEEN_OPTION,
    provider: str = typer.Option(None, "--provider", help="Only models from this provider: hf or file."),
    api_key: str = HIVE_KEY_OPTION,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per model on stdout."),
    deployed: bool = typer.Option(False, "--deployed", help="The models the queen keeps running (models deploy) and their replicas, instead of a node's catalog."),
) -> None:
    """List the models in a node's catalog, or with --deployed the queen's deployments.

    Example: rbee-keeper models list --node workstation --json
    """

    async def main() -> int:
        if deployed:
            from rbee_keeper.commands.deploy import list_deployed

            if hive or node or provider:
                raise RbeeError("USAGE_ERROR", "--deployed lists the queen's deployments: it takes no --hive, --node or --provider",
                                {}, ["List the deployments: `rbee-keeper models list --deployed`",
                                     "Or a node's catalog: `rbee-keeper models list --node NAME`"])  # fmt: skip

            return await list_deployed(queen, api_key, as_json)
        if provider is not None and provider.strip().lower() not in PROVIDERS:
            raise invalid_argument(
                "--provider", provider, f"must be one of {', '.join(PROVIDERS)}", "Pass --provider hf or --provider file"
            )
        async with await hive_for(hive, node, api_key, queen) as client:
            return await _list(client, provider.strip().lower() if provider else None, as_json)

    run(main())


@models_app.command("rm")
def remove(
    model: str = typer.Argument(..., metavar="MODEL", help="The model reference, as listed."),
    node: str = NODE_OPTION,
    hive: str = HIVE_OPTION,
    queen: str = QUEEN_OPTION,
    api_key: str = HIVE_KEY_OPTION,
) -> None:
    """Remove a model from a node's catalog and delete its files.

    Example: rbee-keeper models rm hf:HuggingFaceTB/SmolLM2-135M-Instruct --node workstation
    """

    async def main() -> int:
        parse_model_ref(model)
        async with await hive_for(hive, node, api_key, queen) as client:
            return await _remove(client, model)

    run(main())


@models_app.command("fit")
def fit_cmd(
    model: str = typer.Argument(..., metavar="MODEL", help="The model reference, hf:ORG/REPO or file:///path."),
    backend: str = typer.Option(None, "--backend", help="cpu (default), cuda or metal."),
    slots: int = typer.Option(0, "--slots", min=0, max=256, help="Request slots of the worker (0: the worker's default)."),
    queen: str = QUEEN_OPTION,
    api_key: str = typer.Option(None, "--api-key", metavar="KEY", help="The queen's key (or RBEE_API_KEY, \\[keeper] api_key)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Whether a worker of the model fits on each node: estimate, free memory, fits or short by, and where the queen would place it.

    Example: rbee-keeper models fit hf:HuggingFaceTB/SmolLM2-135M-Instruct --json
    """
    from rbee_keeper.commands.model_fit import fit

    async def main() -> int:
        parse_model_ref(model)
        return await fit(model, validate_backend(backend) or "cpu", slots, queen, api_key, as_json)

    run(main())


QUEEN_KEY_OPTION = typer.Option(None, "--api-key", metavar="KEY", help="The queen's key (or RBEE_QUEEN_API_KEY, \\[keeper] queen_api_key, $RBEE_HOME/queen.key).")


@models_app.command("deploy")
def deploy_cmd(
    model: str = typer.Argument(..., metavar="MODEL", help="The model reference, hf:ORG/REPO or file:///path."),
    replicas: int = typer.Option(1, "--replicas", help="Workers to keep running (1 to 64)."),
    nodes: str = typer.Option(None, "--nodes", metavar="A,B", help="Only these nodes (default: any registered node)."),
    backend: str = typer.Option(None, "--backend", help="cpu (default), cuda or metal."),
    queen: str = QUEEN_OPTION,
    api_key: str = QUEEN_KEY_OPTION,
    as_json: bool = typer.Option(False, "--json", help="The deployment as one JSON object on stdout."),
) -> None:
    """Keep N workers of a model running: the queen places them, restarts crashed ones and moves them off lost nodes.

    Example: rbee-keeper models deploy hf:HuggingFaceTB/SmolLM2-135M-Instruct --replicas 2 --nodes workstation,laptop
    """
    from rbee_keeper.commands.deploy import deploy

    async def main() -> int:
        parse_model_ref(model)
        return await deploy(model, replicas, nodes, validate_backend(backend) or "cpu", queen, api_key, as_json)

    run(main())


@models_app.command("undeploy")
def undeploy_cmd(
    model: str = typer.Argument(..., metavar="MODEL", help="The model reference, as deployed."),
    queen: str = QUEEN_OPTION,
    api_key: str = QUEEN_KEY_OPTION,
    as_json: bool = typer.Option(False, "--json", help="The removed deployment and the workers stopped, as one JSON object."),
) -> None:
    """Stop keeping a model running: the queen forgets the deployment and stops its workers.

    Example: rbee-keeper models undeploy hf:HuggingFaceTB/SmolLM2-135M-Instruct
    """
    from rbee_keeper.commands.deploy import undeploy

    async def main() -> int:
        parse_model_ref(model)
        return await undeploy(model, queen, api_key, as_json)

    run(main())


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
