"""The worker program for a backend, from the worker-environments catalog,
provisioning the environment first when it is missing (S5.3)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from rbee.errors import RbeeError
from rbee_hive.provisioner.environments import WORKER_TYPE, Narrate, WorkerProvisioner, env_id


class ProvisioningResolver:
    """Implements the hive's ``WorkerBinaryResolver``: look the backend's
    environment up in ``workers.db``; if missing, provision it (narrated);
    verify; return its ``llm-worker-rbee``."""

    def __init__(self, provisioner: WorkerProvisioner) -> None:
        self.provisioner = provisioner

    async def resolve(self, backend: str, narrate: Narrate) -> Path:
        backend = (backend or "").strip().lower()
        record = await asyncio.to_thread(self.provisioner.catalog.get, env_id(backend))
        if record is None:
            narrate("📦", f"No {WORKER_TYPE} environment for {backend} on this node yet; provisioning it before the spawn")
            record = await self.provisioner.provision(backend, narrate)
            return record.binary
        try:
            await self.provisioner.verify(record.binary)
        except RbeeError as err:
            err.suggestions[:0] = [
                f"Reinstall it: provision the {backend} worker environment with force "
                f"(ProvisionWorker backend={backend} force=true)"
            ]
            raise
        return record.binary
