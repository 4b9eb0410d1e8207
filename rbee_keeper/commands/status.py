"""`rbee-keeper status`: the whole cluster on one screen, as the queen sees
it: the queen, each node with its hive, every worker (model, device, slots,
state), the models each running hive holds and the models the queen keeps
running (models deploy) with their replicas."""

from __future__ import annotations

import typer

from rbee.backends import backend_name
from rbee_keeper.common import QUEEN_OPTION, run


def register(app: typer.Typer) -> None:
    app.command("status")(status)


def status(
    queen: str = QUEEN_OPTION,
    api_key: str = typer.Option(None, "--api-key", metavar="KEY", help="The queen's key (or RBEE_QUEEN_API_KEY, \\[keeper] queen_api_key, $RBEE_HOME/queen.key)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout: queen, nodes, workers, models."),
) -> None:
    """The queen, each node and its hive, the workers (model, device, slots, state), the models of each node and the deployments.

    Example: rbee-keeper status --json
    """
    run(_status(queen, api_key, as_json))


async def _node_models(client, node) -> tuple[str, list, str]:
    """(node, its models, "" or why they could not be read)."""
    from rbee.errors import RbeeError

    from rbee_keeper.hive_client import HiveClient

    if not node.hive_running:
        return node.name, [], "hive not running"
    try:
        access = await client.node_access(node.name)
        hive = HiveClient(access.hive_address, access.hive_api_key, f"the queen's record of node {node.name}", tls=access.node.tls,
                          tls_name=access.node.tls_name)
        hive.attempts = 1  # the queen just saw it answer; no retries for a summary
        async with hive:
            return node.name, await hive.list_models(), ""
    except RbeeError as err:
        return node.name, [], f"{err.code}: {err.message}"


async def _deployments(client) -> list | None:
    """The queen's deployments; None from a queen of a release without them."""
    from rbee.errors import RbeeError

    try:
        return await client.list_deployments()
    except RbeeError as err:
        if err.code == "VERSION_MISMATCH":
            return None
        raise


async def _status(queen: str | None, api_key: str | None, as_json: bool) -> int:
    import asyncio
    import json

    from rbee.v1 import tasks_pb2

    from rbee_keeper.commands.deploy import DEPLOYMENT_HEADER, deployment_dict, deployment_rows
    from rbee_keeper.commands.models import model_dict
    from rbee_keeper.commands.setup import STATUS, _node_dict
    from rbee_keeper.commands.workers import _state, _worker_dict
    from rbee_keeper.common import resolve_queen
    from rbee_keeper.queen_client import QueenClient

    async with QueenClient.connect(resolve_queen(queen), api_key) as client:
        nodes, workers, deployments = await asyncio.gather(
            client.list_nodes(), client.cluster_workers(tasks_pb2.ListClusterWorkersRequest()), _deployments(client)
        )
        models = await asyncio.gather(*(_node_models(client, n) for n in nodes))
    address = client.address
    if as_json:
        print(json.dumps({
            "queen": {"address": address, "status": "serving"},
            "nodes": [_node_dict(n) for n in nodes],
            "workers": [{"node": c.node, "capability": c.capability, "hive": c.hive_address, **_worker_dict(c.worker)} for c in workers],
            "models": [{"node": name, **model_dict(m)} for name, entries, _ in models for m in entries],
            "models_unavailable": {name: why for name, _, why in models if why},
            "deployments": [deployment_dict(d) for d in deployments or []],
        }))  # fmt: skip
        return 0
    from rich import filesize
    from rich.console import Console
    from rich.table import Table

    from rbee.enum_words import MODEL_FORMATS, TRANSPORTS
    from rbee_keeper.output import use_color

    import sys

    console = Console(highlight=False, width=200, no_color=not use_color(sys.stdout))
    console.print(f"QUEEN  {address}  serving", markup=False)
    table = Table("NODE", "HOST", "STATUS", "HIVE", "BACKENDS", title="nodes", title_justify="left")
    for n in nodes:
        host = "(this machine)" if TRANSPORTS.word(n.connection) == "local" else f"{n.ssh_user}@{n.ssh_host}:{n.ssh_port}"
        hive = (f"up :{n.hive_port}" if n.hive_running else f"down :{n.hive_port}") + (f" ({n.hive_version})" if n.hive_version else "")
        backends = ", ".join(f"{backend_name(b.name)}×{b.device_count}" for b in n.backends) or "-"
        table.add_row(n.name, host, STATUS.get(n.status, "unknown"), hive, backends)
    console.print(table if nodes else "nodes: none registered (rbee-keeper setup add-node --name NAME ...)", markup=False)
    table = Table("NODE", "WORKER", "MODEL", "DEVICE", "SLOTS FREE", "STATE", title="workers", title_justify="left")
    for c in workers:
        w = c.worker
        table.add_row(c.node, w.id, w.model_ref, c.capability, f"{w.slots_available}/{w.slots_total}", _state(w.state))
    console.print(table if workers else "workers: none running", markup=False)
    table = Table("NODE", "MODEL", "SIZE", "FORMAT", title="models", title_justify="left")
    for name, entries, why in models:
        for m in entries:
            table.add_row(name, m.model_ref, filesize.decimal(m.size_bytes), MODEL_FORMATS.word(m.weights_format))
        if why:
            table.add_row(name, f"({why})", "", "")
    console.print(table if table.row_count else "models: none", markup=False)
    table = Table(*DEPLOYMENT_HEADER, title="deployments", title_justify="left")
    for row in deployment_rows(deployments or []):
        table.add_row(*row)
    if deployments is None:
        console.print("deployments: this queen's release keeps none (update it to deploy models)", markup=False)
    else:
        console.print(table if deployments else "deployments: none (rbee-keeper models deploy MODEL --replicas N)", markup=False)
    return 0
