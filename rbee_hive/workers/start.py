"""StartWorker: the hive's part of S1 (steps 6-9) from a model reference.

catalog lookup → download with progress and registration (shared with any
other request for the same model) → import for the backend where the engine
cannot load the format → spawn (which checks resources, provisions the
worker environment if the backend has none, and starts the worker with its
own key). Events go to ``emit`` as they happen; the spawn's own narration is
replayed from the worker's event log once the spawn returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from rbee.backends import backend_name
from rbee.errors import RbeeError
from rbee.modelref import parse_model_ref
from rbee.narration import event
from rbee.v1 import common_pb2, registry_pb2

from rbee_hive.workers.manager import SpawnSpec, WorkerManager
from rbee_hive.workers.registry import WorkerRecord

ACTOR = "rbee-hive"

Emit = Callable[[common_pb2.Event], None]


async def start_worker(manager: WorkerManager, models, request: registry_pb2.StartWorkerRequest, emit: Emit) -> WorkerRecord:
    ref = str(parse_model_ref(request.model_ref))
    backend = backend_name(request.backend) or "cpu"
    if models is None:
        raise RbeeError("NOT_FOUND", "This hive has no model catalog to start workers from")

    def say(emoji: str, message: str) -> None:
        emit(common_pb2.Event(narration=event(ACTOR, emoji, message)))

    say("📚", f"Looking up {ref} in the model catalog")
    record = await models.ensure(ref, backend, on_event=emit)
    say("📦", f"{ref} is in the catalog at {record.local_path}")
    spec = SpawnSpec(model_path="", backend=backend, device=request.device, model_ref=ref, slots=request.slots)
    # Like SpawnWorker: a caller that goes away does not leave a half-started worker.
    worker = await asyncio.shield(manager.spawn(spec))
    worker.queen_keep_alive = request.queen_keep_alive
    for item in worker.events.history():
        if item.HasField("narration"):
            emit(common_pb2.Event(narration=item.narration))
    return worker
