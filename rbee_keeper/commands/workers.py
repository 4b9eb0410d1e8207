"""`rbee-keeper workers list|health|shutdown|spawn|envs|provision`: a hive's
workers and worker environments, reached directly with --hive HOST:PORT
(default: the hive on this machine)."""

from __future__ import annotations

import sys

import typer

from rbee.backends import backend_enum, backend_name
from rbee.config import MAX_SLOTS
from rbee.enum_words import HIVE_STATUSES
from rbee.errors import RbeeError
from rbee.modelref import parse_model_ref
from rbee.narration import stage_of
from rbee.v1 import common_pb2, provisioning_pb2, registry_pb2

from rbee_keeper.common import HIVE_KEY_OPTION, HIVE_OPTION, NODE_OPTION, QUEEN_OPTION, hive_for, resolve_queen, run
from rbee_keeper.listing import show_listing
from rbee_keeper.hive_client import HiveClient
from rbee_keeper.render import LoadingView, local_time, narrator
from rbee_keeper.validation import validate_backend, validate_device

workers_app = typer.Typer(
    help="Workers of a hive: list, health, shutdown, spawn; worker environments: envs, provision.", no_args_is_help=True
)

STATES = {name.removeprefix("WORKER_STATE_").lower(): value for name, value in common_pb2.WorkerState.items() if value}


def _state(value: int) -> str:
    return common_pb2.WorkerState.Name(value).removeprefix("WORKER_STATE_").lower()


def _worker_dict(w: common_pb2.WorkerInfo) -> dict:
    return {
        "id": w.id,
        "state": _state(w.state),
        "model_ref": w.model_ref,
        "backend": backend_name(w.backend),
        "device": w.device,
        "address": w.address,
        "slots_total": w.slots_total,
        "slots_available": w.slots_available,
        "pid": w.pid,
        # Serves mutual TLS (certificates of the cluster CA).
        "tls": w.tls,
        # The dtype its engine runs in and why; the cores it runs on and its engine's threads.
        "dtype": w.dtype,
        "dtype_reason": w.dtype_reason,
        "cpu_set": w.cpu_set,
        "cpu_threads": w.cpu_threads,
        # As the worker last reported it to its hive (None before its first report).
        "load": {
            "running": w.load.running_requests,
            "waiting": w.load.waiting_requests,
            "kv_cache_usage": round(w.load.kv_cache_usage, 4),
            "tokens_per_s": round(w.load.generation_tokens_per_s, 1),
            "unix_ms": w.load.unix_ms,
        } if w.HasField("load") else None,
    }


def _engine(w) -> str:
    """e.g. "float32 · 2 thr on 0-1" ("-" before the model is loaded)."""
    parts = [w.dtype or "-"]
    if w.cpu_threads:
        parts.append(f"{w.cpu_threads} thr on {w.cpu_set}")
    elif w.cpu_set:
        parts.append(f"cores {w.cpu_set}")
    return " · ".join(parts)


def _load(w) -> str:
    """Running/waiting requests and recent tokens/s, as the worker last reported them."""
    if not w.HasField("load"):
        return "-"
    return f"{w.load.running_requests} run · {w.load.waiting_requests} wait · {w.load.generation_tokens_per_s:.1f} tok/s"


@workers_app.command("list")
def list_cmd(
    hive: str = typer.Option(None, "--hive", metavar="HOST:PORT", help="List one hive's workers directly; leave it out to ask the queen for every node's."),
    api_key: str = typer.Option(None, "--api-key", metavar="KEY", help="With --hive: the hive's key (or RBEE_API_KEY, \\[keeper] api_key). Else the queen's."),
    node: str = typer.Option("", "--node", metavar="NAME", help="Through the queen: only this node's workers."),
    capability: str = typer.Option("", "--capability", metavar="CAP", help="Through the queen: only workers on cpu, cuda, cuda:1, ..."),
    queen: str = QUEEN_OPTION,
    model: str = typer.Option("", "--model", help="Only workers serving this model ref."),
    state: str = typer.Option("", "--state", help=f"Only workers in this state ({', '.join(STATES)})."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per worker."),
) -> None:
    """Workers: every node's through the queen, or one hive's with --hive.

    Example: rbee-keeper workers list --node workstation --json
    """

    async def go() -> int:
        wanted = 0
        if state:
            if state.lower() not in STATES:
                raise RbeeError(
                    "INVALID_ARGUMENT",
                    f"Unknown state {state!r}: choose one of {', '.join(STATES)}",
                    {"option": "--state"},
                    [f"Pass --state {next(iter(STATES))}"],
                )
            wanted = STATES[state.lower()]
        if hive is None:
            return await _list_cluster(queen, api_key, node, capability, model, wanted, as_json)
        async with HiveClient.connect(hive, api_key) as client:
            workers = await client.list(model, wanted)
        return show_listing(
            workers, as_json, _worker_dict, f"No workers on {client.address}",
            ("ID", "STATE", "MODEL", "BACKEND", "ENGINE", "ADDRESS", "SLOTS FREE", "LOAD", "PID"),
            lambda w: (w.id, _state(w.state), w.model_ref, f"{backend_name(w.backend)}:{w.device}", _engine(w), w.address,
                       f"{w.slots_available}/{w.slots_total}", _load(w), str(w.pid)),
        )  # fmt: skip

    run(go())


async def _list_cluster(queen: str, api_key: str | None, node: str, capability: str, model: str, state: int, as_json: bool) -> int:
    from rbee.v1 import tasks_pb2

    from rbee_keeper.queen_client import QueenClient

    request = tasks_pb2.ListClusterWorkersRequest(node=node, model_ref=model, capability=capability, state=state)
    async with QueenClient.connect(resolve_queen(queen), api_key) as client:
        workers = await client.cluster_workers(request)
    return show_listing(
        workers, as_json, lambda c: {"node": c.node, "capability": c.capability, "hive": c.hive_address, **_worker_dict(c.worker)},
        f"No workers on any node known to the queen at {client.address}",
        ("NODE", "ID", "STATE", "MODEL", "DEVICE", "ENGINE", "ADDRESS", "SLOTS FREE", "LOAD"),
        lambda c: (c.node, c.worker.id, _state(c.worker.state), c.worker.model_ref, c.capability, _engine(c.worker), c.worker.address,
                   f"{c.worker.slots_available}/{c.worker.slots_total}", _load(c.worker)),
    )  # fmt: skip


@workers_app.command("health")
def health_cmd(
    node: str = NODE_OPTION,
    hive: str = HIVE_OPTION,
    queen: str = QUEEN_OPTION,
    api_key: str = HIVE_KEY_OPTION,
    worker_id: str = typer.Option("", "--id", help="Only this worker."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per worker checked."),
) -> None:
    """Ask a node's hive to health-check its workers now. Exit 1 when one does not answer.

    Example: rbee-keeper workers health --node workstation
    """

    async def go() -> int:
        async with await hive_for(hive, node, api_key, queen) as client:
            hive_health = await client.hive_health()
            results = await client.health(worker_id)
        say = narrator()
        say("🐝", f"Hive {client.address}: {HIVE_STATUSES.word(hive_health.hive_status)}, version {hive_health.version} (API {hive_health.api_version}), {hive_health.workers} worker(s)")
        bad = 0
        for h in results:
            w = h.worker
            if as_json:
                import json

                bad += not h.reachable
                print(json.dumps({**_worker_dict(w), "reachable": h.reachable, "health": h.status, "latency_ms": h.latency_ms,
                                  "consecutive_failures": h.consecutive_failures}))  # fmt: skip
            elif h.reachable:
                print(f"✅ {w.id} {w.address} {_state(w.state)} health={h.status} {h.latency_ms}ms")
            else:
                bad += 1
                print(f"❌ {w.id} {w.address} {_state(w.state)} unreachable ({h.status}); failed checks in a row: {h.consecutive_failures + 1}")
        if not results:
            say("📭", "No workers to check")
        return 1 if bad else 0

    run(go())


@workers_app.command("shutdown")
def shutdown_cmd(
    node: str = NODE_OPTION,
    hive: str = HIVE_OPTION,
    queen: str = QUEEN_OPTION,
    api_key: str = HIVE_KEY_OPTION,
    worker_id: str = typer.Option(..., "--id", help="The worker to stop (see `workers list`)."),
    timeout: int = typer.Option(0, "--timeout", min=0, help="Seconds to let it drain before it is force-killed (0 = the hive's 30 s)."),
) -> None:
    """Gracefully stop one worker (force-killed if it does not exit in time).

    Example: rbee-keeper workers shutdown --node workstation --id worker-1
    """

    async def go() -> int:
        say = narrator()
        async with await hive_for(hive, node, api_key, queen) as client:
            say("👋", f"Asking {client.address} to shut down {worker_id}")
            result = await client.shutdown(worker_id, timeout)
        how = "force-killed" if result.force_killed else f"exited with code {result.exit_code}"
        say("🛑", f"{result.worker_id} stopped ({how})")
        return 0

    run(go())


@workers_app.command("spawn")
def spawn_cmd(
    node: str = NODE_OPTION,
    hive: str = HIVE_OPTION,
    queen: str = QUEEN_OPTION,
    api_key: str = HIVE_KEY_OPTION,
    model: str = typer.Option(
        ..., "--model",
        help="A model in the hive's catalog (hf:ORG/REPO, file:///PATH) or a folder under the hive's model folders.",
    ),
    backend: str = typer.Option("cpu", "--backend", help="cpu, cuda or metal (never changed for you)."),
    device: str = typer.Option("0", "--device", help="Device index on that backend."),
    model_ref: str = typer.Option("", "--model-ref", help="Name a folder is listed under (default file://PATH)."),
    slots: int = typer.Option(
        0, "--slots", min=0, max=MAX_SLOTS, help=f"Concurrent requests, at most {MAX_SLOTS} (0 = the worker's default)."
    ),
    follow: bool = typer.Option(True, "--follow/--no-follow", help="Show narration and loading progress until loaded."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for the spawn and the loading."),
) -> None:
    """Start a worker on a hive; prints `ID ADDRESS KEY` on stdout once it is loaded.

    KEY is the worker's own key (it opens that worker's inference service only):
    RBEE_API_KEY=KEY rbee-keeper infer --worker ADDRESS --prompt "..."

    Example: rbee-keeper workers spawn --model hf:HuggingFaceTB/SmolLM2-135M-Instruct --backend cpu --device 0
    """

    async def go() -> int:
        b = validate_backend(backend)
        d = validate_device(device)
        say = narrator()
        if model.startswith(("hf:", "file:")):
            # A catalog reference: the hive loads what its catalog holds for it.
            if model_ref:
                raise RbeeError("USAGE_ERROR", "--model-ref names a folder; --model is already a reference",
                                {"model": model, "model_ref": model_ref}, ["Leave --model-ref out"])
            path, ref = "", str(parse_model_ref(model))
        else:
            path, ref = model, model_ref
        request = registry_pb2.SpawnWorkerRequest(model_path=path, backend=backend_enum(b or "cpu"), device=d or 0, model_ref=ref, slots=slots)
        async with await hive_for(hive, node, api_key, queen) as client:
            say("🚀", f"Asking {client.address} to start a worker for {model_ref or model} on {b or 'cpu'}:{request.device}")
            reply = await client.spawn(request, timeout)
            worker = reply.worker
            say("📞", f"{worker.id} is up on {worker.address} (state {_state(worker.state)}); log on the node: {reply.log_path}")
            if follow:
                view = LoadingView(worker.id, say)
                try:
                    async for item in client.follow(worker.id):
                        kind = item.WhichOneof("kind")
                        if kind == "narration":
                            view.narration(item.narration)
                        elif kind == "progress":
                            view.update(item.progress)
                        elif kind == "worker":
                            worker = item.worker
                finally:
                    view.close()
                say("✅", f"{worker.id} is {_state(worker.state)} on {worker.address}")
        # The key opens this worker's inference service and nothing else:
        # `RBEE_API_KEY=KEY rbee-keeper infer --worker ADDRESS ...`.
        print(f"{worker.id} {worker.address} {reply.worker_api_key}")
        sys.stdout.flush()
        return 0

    run(go())


def _env_dict(e: provisioning_pb2.WorkerEnvironment) -> dict:
    return {
        "id": e.id,
        "worker_type": e.worker_type,
        "backend": backend_name(e.backend),
        "features": list(e.features),
        "path": e.path,
        "binary_path": e.binary_path,
        "version": e.version,
        "engine": e.engine,
        "source": e.source,
        "installed_at_unix_ms": e.installed_at_unix_ms,
    }


@workers_app.command("envs")
def envs_cmd(
    node: str = NODE_OPTION,
    hive: str = HIVE_OPTION,
    queen: str = QUEEN_OPTION,
    api_key: str = HIVE_KEY_OPTION,
    backend: str = typer.Option(None, "--backend", help="Only this backend's environment (cpu, cuda or metal)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per environment."),
) -> None:
    """The worker environments installed on a node (one per backend).

    Example: rbee-keeper workers envs --node workstation --json
    """

    async def go() -> int:
        wanted = validate_backend(backend)
        async with await hive_for(hive, node, api_key, queen) as client:
            envs = await client.worker_environments(wanted or "")
        return show_listing(
            envs, as_json, _env_dict, f"No worker environments on {client.address}" + (f" for {wanted}" if wanted else ""),
            ("ID", "BACKEND", "VERSION", "ENGINE", "INSTALLED", "PATH"),
            lambda e: (e.id, backend_name(e.backend), e.version, e.engine, local_time(e.installed_at_unix_ms), e.path),
        )

    run(go())


@workers_app.command("provision")
def provision_cmd(
    node: str = NODE_OPTION,
    hive: str = HIVE_OPTION,
    queen: str = QUEEN_OPTION,
    api_key: str = HIVE_KEY_OPTION,
    backend: str = typer.Option(..., "--backend", help="cpu or cuda (metal on Apple silicon): the environment to install."),
    source: str = typer.Option(
        "", "--source", metavar="PATH",
        help="One of the project sources the hive's operator configured (worker_sources, RBEE_HIVE_WORKER_SOURCES); "
        "default: the hive's own installation. Any other folder is refused.",
    ),
    force: bool = typer.Option(False, "--force", help="Reinstall even if a working environment is recorded."),
) -> None:
    """Install the worker environment for a backend on the hive's node (or reuse it).

    The hive's narration goes to stderr, `ID BINARY` to stdout. Ctrl+C stops
    waiting; the hive finishes the install.

    Example: rbee-keeper workers provision --node workstation --backend cpu
    """

    async def go() -> int:
        wanted = validate_backend(backend)
        say = narrator()
        env: provisioning_pb2.WorkerEnvironment | None = None
        async with await hive_for(hive, node, api_key, queen) as client:
            say("🔨", f"Asking {client.address} to provision the {wanted} worker environment" + (" (forced)" if force else ""))
            async for msg in client.provision_worker(wanted, source, force):
                if msg.HasField("environment"):
                    env = msg.environment
                elif msg.event.HasField("narration"):
                    say.emit(msg.event.narration)
                elif msg.event.HasField("progress"):
                    p = msg.event.progress
                    say("⏳", " · ".join(part for part in (stage_of(p), p.message) if part) or "provisioning")
        if env is None:
            raise RbeeError(
                "STREAM_BROKEN",
                f"{client.address} ended the provisioning of {wanted} without a result",
                {"hive": client.address, "backend": wanted},
                [f"Run it again, or see what the hive recorded: rbee-keeper workers envs --hive {client.address}"],
            )
        say("✅", f"{env.id} on {client.address}: rbee {env.version}, {env.engine}, in {env.path}")
        print(f"{env.id} {env.binary_path}")
        sys.stdout.flush()
        return 0

    run(go())


def register(app: typer.Typer) -> None:
    app.add_typer(workers_app, name="workers")
