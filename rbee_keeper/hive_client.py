"""keeper's client for one hive: its HiveWorkerService, PreflightService and
ProvisioningService on one channel, the API key on every call, failures as
RbeeError naming the hive and where the key came from."""

from __future__ import annotations

from collections.abc import AsyncIterator

from rbee.backends import backend_enum
from rbee.enum_words import MODEL_PROVIDERS
from rbee.errors import RbeeError
from rbee.v1 import (
    preflight_pb2,
    preflight_pb2_grpc,
    provisioning_pb2,
    provisioning_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

from rbee_keeper.credentials import resolve_api_key
from rbee_keeper.daemon_client import DaemonClient
from rbee_keeper.validation import validate_hive_address


class HiveClient(DaemonClient):
    what = "the hive"
    update_hint = "Update the node to this release (`rbee-keeper setup install --node NAME`), then restart its hive"

    def _bind(self, channel) -> None:
        self._workers = registry_pb2_grpc.HiveWorkerServiceStub(channel)
        self._preflight = preflight_pb2_grpc.PreflightServiceStub(channel)
        self._provisioning = provisioning_pb2_grpc.ProvisioningServiceStub(channel)

    def unreachable_hints(self) -> list[str]:
        return [f"Check that rbee-hive is running there (rbee-hive daemon --port {self.address.rpartition(':')[2]})"]

    @classmethod
    def connect(cls, hive: str, api_key: str | None) -> "HiveClient":
        """A client for what the user typed: the address checked, the key looked up
        (--api-key, RBEE_API_KEY, config file). Nothing is sent yet."""
        address = validate_hive_address(hive)
        key, source = resolve_api_key(api_key, address)
        return cls(address, key, source)

    def translate(self, err: RbeeError) -> RbeeError:
        if err.code == "UNAVAILABLE" and "grpc_status" in err.details:  # nothing answered
            return RbeeError(
                "HIVE_UNREACHABLE",
                f"Cannot reach the hive at {self.address}",
                {"hive": self.address},
                self.unreachable_hints(),
            )
        return err

    # -- workers (HiveWorkerService) -------------------------------------------------------

    async def spawn(self, request: registry_pb2.SpawnWorkerRequest, timeout: float) -> registry_pb2.SpawnWorkerResponse:
        return await self._unary(self._workers.SpawnWorker, request, timeout)

    def follow(self, worker_id: str) -> AsyncIterator[registry_pb2.FollowWorkerResponse]:
        return self._stream(self._workers.FollowWorker, registry_pb2.FollowWorkerRequest(worker_id=worker_id))

    async def list(self, model_ref: str = "", state: int = 0) -> list:
        reply = await self._unary(self._workers.ListWorkers, registry_pb2.ListWorkersRequest(model_ref=model_ref, state=state))
        return list(reply.workers)

    async def health(self, worker_id: str = "") -> list:
        reply = await self._unary(
            self._workers.CheckWorkersHealth, registry_pb2.CheckWorkersHealthRequest(worker_id=worker_id), 60.0
        )
        return list(reply.workers)

    async def shutdown(self, worker_id: str, timeout_s: int = 0) -> registry_pb2.ShutdownWorkerResponse:
        request = registry_pb2.ShutdownWorkerRequest(worker_id=worker_id, timeout_ms=timeout_s * 1000)
        return await self._unary(self._workers.ShutdownWorker, request, (timeout_s or 30) + 30.0)

    def logs(self, worker_id: str = "", tail_lines: int = 0, follow: bool = False) -> AsyncIterator[registry_pb2.StreamLogsResponse]:
        request = registry_pb2.StreamLogsRequest(worker_id=worker_id, tail_lines=tail_lines, follow=follow)
        return self._stream(self._workers.StreamLogs, request)

    # -- the node (PreflightService) -------------------------------------------------------

    async def hive_health(self) -> preflight_pb2.GetHiveHealthResponse:
        return await self._unary(self._preflight.GetHiveHealth, preflight_pb2.GetHiveHealthRequest())

    # -- models (ProvisioningService) ------------------------------------------------------

    def download_model(self, model_ref: str, backend: str = "") -> AsyncIterator[provisioning_pb2.DownloadModelResponse]:
        request = provisioning_pb2.DownloadModelRequest(model_ref=model_ref, backend=backend_enum(backend))
        return self._stream(self._provisioning.DownloadModel, request)

    async def list_models(self, provider: str = "") -> list:
        # No deadline: the catalog calls wait on the node's disk, as they always did.
        request = provisioning_pb2.ListModelsRequest(origin=MODEL_PROVIDERS.number(provider))
        reply = await self._unary(self._provisioning.ListModels, request, None)
        return list(reply.models)

    async def remove_model(self, model_ref: str) -> provisioning_pb2.RemoveModelResponse:
        request = provisioning_pb2.RemoveModelRequest(model_ref=model_ref)
        return await self._unary(self._provisioning.RemoveModel, request, None)

    # -- worker environments (ProvisioningService) -----------------------------------------

    async def worker_environments(self, backend: str = "") -> list:
        request = provisioning_pb2.ListWorkerEnvironmentsRequest(backend=backend_enum(backend))
        reply = await self._unary(self._provisioning.ListWorkerEnvironments, request)
        return list(reply.environments)

    def provision_worker(
        self, backend: str, source: str = "", force: bool = False
    ) -> AsyncIterator[provisioning_pb2.ProvisionWorkerResponse]:
        # No deadline: an engine install can take many minutes; the hive narrates it.
        request = provisioning_pb2.ProvisionWorkerRequest(backend=backend_enum(backend), source=source, force=force)
        return self._stream(self._provisioning.ProvisionWorker, request)
