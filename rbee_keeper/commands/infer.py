"""`rbee-keeper infer`: stream an answer from a model.

Queen mode (``--model REF`` with or without ``--node NAME``): the queen places
the request or uses the node named, finds or starts a worker, then the keeper streams from it directly. Direct mode
(``--worker HOST:PORT``) talks to one running worker.
"""

from __future__ import annotations

from dataclasses import replace

import typer

from rbee.backends import backend_enum
from rbee.errors import RbeeError
from rbee.modelref import parse_model_ref

from rbee_keeper.common import run
from rbee_keeper.credentials import resolve_api_key
from rbee_keeper.direct import DirectInference, Timeouts
from rbee_keeper.interrupts import Interrupts
from rbee_keeper.render import TokenPrinter, narrator, set_json_answer
from rbee_keeper.validation import (
    parse_float,
    validate_address,
    validate_backend,
    validate_device,
    validate_sampling,
)
from rbee_keeper.worker_client import WorkerClient

DEFAULT_MAX_TOKENS = 128

HELP = """Stream an answer from a model: tokens on stdout, progress and status on stderr.

Queen mode: --model REF asks the queen (--queen, default 127.0.0.1:7800) for a worker
serving the model: without --node (and no default node) the queen places it (a warm
worker with a free slot anywhere, else a node where it fits, and says why); with
--node NAME on that node: an idle one is reused (warm start), else the node's hive
downloads the model and starts one (cold start). When no queen answers
on this machine, one is started for this command and stopped afterwards.

Example: rbee-keeper infer --node workstation --model hf:HuggingFaceTB/SmolLM2-135M-Instruct --prompt "Why do bees dance?"

Direct mode: --worker HOST:PORT sends the request to a running llm-worker-rbee
(waiting for it to finish loading). If the stream breaks, the text received so far
is saved under $RBEE_HOME/partial/ (default ~/.rbee/partial/) and its path printed.
Exit codes: 0 done, 1 error, 130 interrupted.
"""


def _timeout(option: str, value: str | None, default: float) -> float:
    hint = f"{option} takes seconds, e.g. {option} {default:g}"
    parsed = parse_float(option, value, hint)
    if parsed is None:
        return default
    if parsed <= 0:
        raise RbeeError("INVALID_ARGUMENT", f"{option} must be above 0 (got {value!r})", {"option": option}, [hint])
    return parsed


def register(app: typer.Typer) -> None:
    app.command("infer", help=HELP)(infer)


def infer(
    prompt: str = typer.Option(None, "--prompt", "-p", help="Text to complete (sent through the model's chat template)."),
    max_tokens: str = typer.Option(str(DEFAULT_MAX_TOKENS), "--max-tokens", "-n", metavar="N", help="Most tokens to generate (≥ 1)."),
    temperature: str = typer.Option(None, "--temperature", "-t", metavar="T", help="0 = greedy; up to 2 (default: the model's, else 1)."),
    top_p: str = typer.Option(None, "--top-p", metavar="P", help="Nucleus sampling, in (0, 1]."),
    top_k: str = typer.Option(None, "--top-k", metavar="K", help="Sample among the K likeliest tokens (≥ 1)."),
    seed: str = typer.Option(None, "--seed", metavar="SEED", help="Seed for reproducible sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop when this text is generated (repeatable)."),
    raw_prompt: bool = typer.Option(False, "--raw-prompt", help="Send the prompt as-is, without the chat template."),
    system: str = typer.Option(None, "--system", metavar="TEXT", help="A system message before the prompt (instructions for the model)."),
    chat: str = typer.Option(None, "--chat", metavar="FILE|-", help='Messages as JSON, [{"role": "user", "content": "..."}, ...], from FILE or stdin (-); --prompt adds a user turn.'),
    json_schema: str = typer.Option(None, "--json-schema", metavar="FILE", help="Constrain the answer to JSON valid against the JSON Schema in FILE."),
    logprobs: str = typer.Option(None, "--logprobs", metavar="N", help="Log probabilities of each token and its N likeliest alternatives (0-20), on stderr (in the object with --json)."),
    n: str = typer.Option(None, "--n", metavar="COUNT", help="Generate COUNT answers (needs a temperature above 0); the first streams, the others follow."),
    worker: str = typer.Option(None, "--worker", "-w", metavar="HOST:PORT", help="Send the request straight to this worker."),
    api_key: str = typer.Option(None, "--api-key", help="Queen mode: the queen's key (else RBEE_QUEEN_API_KEY, config, $RBEE_HOME/queen.key). Direct mode: the worker's key (else $RBEE_API_KEY, then the config file)."),
    node: str = typer.Option(None, "--node", help="Node to run on (queen mode; default: RBEE_NODE, \\[keeper] node; see `rbee-keeper setup list-nodes`)."),
    model: str = typer.Option(None, "--model", "-m", help="Model reference, hf:ORG/REPO or file:///path on the node (queen mode)."),
    slots: int = typer.Option(0, "--slots", min=0, max=256, help="Queen mode: request slots of a worker started for this task (0 = the worker's default)."),
    keep_alive: str = typer.Option(None, "--keep-alive", metavar="DURATION", help="Queen mode: how long the worker stays loaded once idle (5m, 30s, 1h30m or seconds; 0 = stop it after this answer; -1 = never; default: the model's, else the queen's --keep-alive)."),
    queen: str = typer.Option(None, "--queen", metavar="HOST:PORT", help="The queen (queen mode; default: RBEE_QUEEN, \\[keeper] queen, else 127.0.0.1:7800); one is started for this command when none answers on this machine."),
    backend: str = typer.Option(None, "--backend", help="cpu, cuda or metal; with --worker, checked against the worker."),
    device: str = typer.Option(None, "--device", metavar="N", help="Device index; with --worker, checked against the worker."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, finish reason, token counts, timings) on stdout at the end instead of streaming the tokens."),
    # Knobs for tests and operators; not part of the everyday interface.
    ignore_eos: bool = typer.Option(False, "--ignore-eos", hidden=True),
    stall_timeout: str = typer.Option(None, "--stall-timeout", hidden=True, envvar="RBEE_KEEPER_STALL_TIMEOUT_S"),
    loading_timeout: str = typer.Option(None, "--loading-timeout", hidden=True, envvar="RBEE_KEEPER_LOADING_TIMEOUT_S"),
    connect_timeout: str = typer.Option(None, "--connect-timeout", hidden=True, envvar="RBEE_KEEPER_CONNECT_TIMEOUT_S"),
) -> None:
    set_json_answer(as_json)
    run(
        _infer(
            prompt, max_tokens, temperature, top_p, top_k, seed, tuple(stop), raw_prompt,
            worker, api_key, node, model, queen, slots, backend, device, ignore_eos,
            stall_timeout, loading_timeout, connect_timeout,
            contract=dict(system=system, chat=chat, json_schema=json_schema, logprobs=logprobs, n=n),
            keep_alive=keep_alive,
        )
    )


async def _infer(
    prompt: str | None,
    max_tokens: str,
    temperature: str | None,
    top_p: str | None,
    top_k: str | None,
    seed: str | None,
    stop: tuple[str, ...],
    raw_prompt: bool,
    worker: str | None,
    api_key: str | None,
    node: str | None,
    model: str | None,
    queen: str,
    slots: int,
    backend: str | None,
    device: str | None,
    ignore_eos: bool,
    stall_timeout: str | None,
    loading_timeout: str | None,
    connect_timeout: str | None,
    contract: dict | None = None,
    keep_alive: str | None = None,
) -> int:
    # Everything is checked before anything is contacted (files named by
    # --chat and --json-schema are read and checked here too).
    args = validate_sampling(prompt, max_tokens, temperature, top_p, top_k, seed, stop, raw_prompt, ignore_eos, **(contract or {}))
    backend_name = validate_backend(backend)
    device_index = validate_device(device)
    if model is not None:
        parse_model_ref(model)
    if keep_alive is not None:
        from rbee_queen.keepalive import parse_keep_alive

        parse_keep_alive(keep_alive, "--keep-alive")
    defaults = Timeouts()
    timeouts = Timeouts(
        connect_s=_timeout("--connect-timeout", connect_timeout, defaults.connect_s),
        wait_for_server=connect_timeout is not None,
        loading_s=_timeout("--loading-timeout", loading_timeout, defaults.loading_s),
        stall_s=_timeout("--stall-timeout", stall_timeout, defaults.stall_s),
    )
    if worker is None:
        return await _infer_with_queen(args, node, model, queen, api_key, backend_name, device_index, timeouts, slots,
                                       keep_alive or "")  # fmt: skip
    address = validate_address(worker)
    key, key_source = resolve_api_key(api_key, address)

    narrate = narrator()
    interrupts = Interrupts(narrate)
    narrate("🐝", f"Sending the request straight to worker {address}")
    if model is not None or node is not None:
        narrate("🐝", "With --worker, --node and --model are not used: the worker serves the model it loaded")
    if keep_alive is not None:
        narrate("🐝", "With --worker, --keep-alive is not used: the queen keeps workers by their keep-alive (queen mode)")
    async with WorkerClient(address, key, key_source) as client:
        interrupts.install()
        try:
            session = DirectInference(
                client,
                args,
                narrate,
                TokenPrinter(),
                interrupts,
                timeouts,
                expect_backend=backend_name,
                expect_device=device_index,
            )
            return await session.run()
        finally:
            interrupts.uninstall()


async def _infer_with_queen(args, node: str | None, model: str | None, queen: str, api_key: str | None,
                            backend: str | None, device: int | None, timeouts: Timeouts, slots: int = 0,
                            keep_alive: str = "") -> int:  # fmt: skip
    from rbee_keeper.common import resolve_node, resolve_queen

    node, queen = resolve_node(node), resolve_queen(queen)
    # Without a node (and no default node) the queen places the request (docs/queen.md, "Placement").
    if not model:
        raise RbeeError(
            "USAGE_ERROR",
            "infer needs --model (queen mode) or --worker HOST:PORT (direct mode)",
            {"missing": "--model"},
            ["Pass --model REF (and --node NAME to pin a node, see `rbee-keeper setup list-nodes`), or --worker HOST:PORT"],
        )
    from rbee.v1 import tasks_pb2

    from rbee_keeper.queen_mode import run_with_queen

    narrate = narrator()
    request = tasks_pb2.SubmitInferenceRequest(node=node or "", model_ref=model, backend=backend_enum(backend or "cpu"), device=device or 0, slots=slots,
                                               keep_alive=keep_alive)  # fmt: skip
    # The queen queues for busy slots: the blind retries are the direct mode's alone (rbee_keeper/queen_mode.py).
    timeouts = replace(timeouts, busy_delays_s=())

    async def use_worker(assignment) -> int:
        interrupts = Interrupts(narrate)
        async with WorkerClient(
            assignment.worker.address, assignment.api_key, f"the queen's task on {assignment.node}", tls=assignment.worker.tls,
            tls_name=assignment.worker.tls_name,
        ) as client:
            interrupts.install()
            try:
                session = DirectInference(client, args, narrate, TokenPrinter(), interrupts, timeouts,
                                          expect_backend=backend, expect_device=device)  # fmt: skip
                return await session.run()
            finally:
                interrupts.uninstall()

    return await run_with_queen(queen, api_key, request, narrate, use_worker)
