"""Everything one running hive holds, built once and handed to the servicers."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from rbee.config import API_VERSION, VERSION
from rbee.narration import Narrator, format_line

from rbee_hive.logbook import HIVE_SOURCE, LogBook
from rbee_hive.resources import ResourceSource, resource_source
from rbee_hive.settings import HiveSettings
from rbee_hive.workers.binary import ConfiguredBinaryResolver, WorkerBinaryResolver
from rbee_hive.workers.manager import WorkerManager
from rbee_hive.workers.registry import Registry
from rbee_hive.workers.supervisor import Supervisor

ACTOR = "rbee-hive"


@dataclass
class HiveContext:
    settings: HiveSettings
    narrate: Narrator
    logbook: LogBook
    resources: ResourceSource
    registry: Registry
    manager: WorkerManager
    supervisor: Supervisor
    # host:port the workers call back on; set once the server is bound.
    callback_address: str = ""
    status: str = "ok"
    version: str = VERSION
    api_version: str = API_VERSION
    hostname: str = field(default_factory=socket.gethostname)
    started: float = field(default_factory=time.monotonic)

    def uptime_s(self) -> float:
        return time.monotonic() - self.started


def build_context(
    settings: HiveSettings,
    resources: ResourceSource | None = None,
    resolver: WorkerBinaryResolver | None = None,
    narrator: Narrator | None = None,
) -> HiveContext:
    """Must run inside the event loop (the registry and logs use asyncio)."""
    narrate = narrator or Narrator(ACTOR)
    logbook = LogBook(settings.logs_dir)
    narrate.add_sink(lambda ev: logbook.write(HIVE_SOURCE, format_line(ev)))
    resources = resources or resource_source(settings.resource_overrides)
    registry = Registry()
    holder: dict[str, HiveContext] = {}
    manager = WorkerManager(
        settings,
        registry,
        resources,
        resolver or ConfiguredBinaryResolver(settings.worker_binary),
        logbook,
        narrate,
        callback_address=lambda: holder["ctx"].callback_address,
    )
    supervisor = Supervisor(settings, manager, narrate)
    ctx = HiveContext(settings, narrate, logbook, resources, registry, manager, supervisor)
    holder["ctx"] = ctx
    return ctx
