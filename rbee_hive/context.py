"""Everything one running hive holds, built once and handed to the servicers."""

from __future__ import annotations

import socket
import stat
import time
from dataclasses import dataclass, field

from rbee.config import API_VERSION, VERSION
from rbee.narration import Narrator, format_line
from rbee.paths import private_dir

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
    status: str = "healthy"
    version: str = VERSION
    api_version: str = API_VERSION
    hostname: str = field(default_factory=socket.gethostname)
    started: float = field(default_factory=time.monotonic)

    def uptime_s(self) -> float:
        return time.monotonic() - self.started


# The folders of RBEE_HOME the hive owns: created 0700, narrowed to 0700 if older.
HOME_FOLDERS = ("logs", "models", "workers")


def prepare_home(settings: HiveSettings) -> str | None:
    """Create RBEE_HOME (0700 when the hive creates it) and its folders (0700).
    An existing RBEE_HOME is the operator's choice and is not changed; what it
    lets others do is returned as a warning to narrate."""
    home = settings.rbee_home
    private_dir(home, tighten=False)
    for name in HOME_FOLDERS:
        private_dir(home / name)
    mode = stat.S_IMODE(home.stat().st_mode)
    if mode & 0o077:
        return (
            f"{home} is open to other users (mode {mode:03o}); its folders are 0700 and its files 0600, "
            f"but `chmod 700 {home}` closes it"
        )
    return None


def build_context(
    settings: HiveSettings,
    resources: ResourceSource | None = None,
    resolver: WorkerBinaryResolver | None = None,
    narrator: Narrator | None = None,
) -> HiveContext:
    """Must run inside the event loop (the registry and logs use asyncio)."""
    home_warning = prepare_home(settings)
    narrate = narrator or Narrator(ACTOR)
    logbook = LogBook(settings.logs_dir, settings.log_max_bytes, settings.log_backups)
    narrate.add_sink(lambda ev: logbook.write(HIVE_SOURCE, format_line(ev)))
    resources = resources or resource_source(settings.resource_overrides)
    registry = Registry(settings.watch_heartbeat.total_seconds())
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
    if home_warning:
        narrate("⚠️", home_warning, "warn")
    return ctx
