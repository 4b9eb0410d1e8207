"""`rbee-keeper models deploy|undeploy` and the desired state in `models list
--deployed` and `status` (docs/queen.md, "Replicas"): models the queen keeps
running, N workers each, on the nodes allowed."""

from __future__ import annotations

import json
import sys

from rbee.backends import backend_enum, backend_name
from rbee.enum_words import DEPLOYMENT_STATES
from rbee.v1 import replicas_pb2

from rbee_keeper.common import resolve_queen
from rbee_keeper.render import local_time, narrator
from rbee_keeper.validation import invalid_argument

# The queen's own bounds (rbee_queen/deployments.py), checked here first.
MAX_REPLICAS = 64
MAX_NODES = 64


def deployment_dict(d: replicas_pb2.Deployment) -> dict:
    return {"model_ref": d.model_ref, "replicas": d.replicas, "nodes": list(d.nodes), "backend": backend_name(d.backend),
            "created_at_unix_ms": d.created_at_unix_ms, "running": d.running, "ready": d.ready, "workers": list(d.workers),
            "current_state": DEPLOYMENT_STATES.word(d.current_state), "state_detail": d.state_detail,
            "last_error": d.last_error}  # fmt: skip


def deployment_rows(deployments: list[replicas_pb2.Deployment]) -> list[tuple[str, ...]]:
    rows = []
    for d in deployments:
        when = local_time(d.created_at_unix_ms)
        state = " ".join(part for part in (DEPLOYMENT_STATES.word(d.current_state), d.state_detail) if part)
        state += f" ({d.last_error})" if d.last_error else ""
        rows.append((d.model_ref, f"{d.ready}/{d.replicas}", ", ".join(d.nodes) or "any", when, state))
    return rows


DEPLOYMENT_HEADER = ("DEPLOYED MODEL", "READY", "NODES", "CREATED", "STATE")


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def parse_nodes(nodes: str | None) -> list[str]:
    if not nodes:
        return []
    names = [n.strip() for n in nodes.split(",")]
    if any(not n for n in names):
        raise invalid_argument("--nodes", nodes, "is a comma-separated list of node names with none empty",
                               "Pass e.g. --nodes workstation,laptop (see `rbee-keeper setup list-nodes`)")  # fmt: skip
    if len(names) > MAX_NODES:
        raise invalid_argument("--nodes", f"{len(names)} names", f"names at most {MAX_NODES} nodes",
                               "Leave --nodes out to allow every registered node")  # fmt: skip
    return names


async def deploy(model: str, replicas: int, nodes: str | None, backend: str, queen: str | None, api_key: str | None, as_json: bool) -> int:
    from rbee_keeper.queen_client import QueenClient

    if not 1 <= replicas <= MAX_REPLICAS:
        raise invalid_argument("--replicas", replicas, f"must be between 1 and {MAX_REPLICAS}",
                               f"Pass --replicas 1 to {MAX_REPLICAS}: `rbee-keeper models deploy {model} --replicas 2`")  # fmt: skip
    request = replicas_pb2.DeployModelRequest(model_ref=model, replicas=replicas, nodes=parse_nodes(nodes), backend=backend_enum(backend))
    async with QueenClient.connect(resolve_queen(queen), api_key) as client:
        reply = await client.deploy_model(request)
    d = reply.deployment
    if as_json:
        print(json.dumps({**deployment_dict(d), "replaced": reply.replaced}))
        return 0
    where = ", ".join(d.nodes) or "any node"
    narrator(sys.stderr)("📌", f"{'Redeployed' if reply.replaced else 'Deployed'} {d.model_ref}: {d.replicas} replica(s) on {where}; "
                         f"the queen starts them now (follow with `rbee-keeper models list --deployed`)")  # fmt: skip
    return 0


async def undeploy(model: str, queen: str | None, api_key: str | None, as_json: bool) -> int:
    from rbee_keeper.queen_client import QueenClient

    async with QueenClient.connect(resolve_queen(queen), api_key) as client:
        reply = await client.undeploy_model(model)
    if as_json:
        print(json.dumps({**deployment_dict(reply.deployment), "stopped": list(reply.stopped)}))
        return 0
    stopped = ", ".join(reply.stopped) or "none running"
    narrator(sys.stderr)("📍", f"Undeployed {reply.deployment.model_ref}; workers stopped: {stopped}")
    return 0


async def list_deployed(queen: str | None, api_key: str | None, as_json: bool) -> int:
    from rbee_keeper.queen_client import QueenClient

    async with QueenClient.connect(resolve_queen(queen), api_key) as client:
        deployments = await client.list_deployments()
    if as_json:
        for d in deployments:
            print(json.dumps(deployment_dict(d)))
        return 0
    if not deployments:
        narrator(sys.stderr)("📭", "No model is deployed (deploy one with `rbee-keeper models deploy MODEL --replicas N`)")
        return 0
    print_table(DEPLOYMENT_HEADER, deployment_rows(deployments))
    return 0
