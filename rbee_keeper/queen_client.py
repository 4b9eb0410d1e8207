"""keeper's client for the queen: its NodeService on one channel, the queen's
key on every call, failures as RbeeError naming the queen and where the key
came from. The key is looked up as --api-key, RBEE_QUEEN_API_KEY, the config
file's ``[keeper] queen_api_key``, then ``$RBEE_HOME/queen.key`` (written by a
queen of the same user on this machine)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from rbee.auth import read_key_file
from rbee.config import keeper_settings, rbee_home
from rbee.enum_words import APP_KEY_SCOPES
from rbee.errors import RbeeError
from rbee.tls_identity import QUEEN_NAME
from rbee.v1 import keys_pb2, keys_pb2_grpc, nodes_pb2, nodes_pb2_grpc, replicas_pb2, replicas_pb2_grpc, tasks_pb2, tasks_pb2_grpc

from rbee_keeper.daemon_client import DaemonClient
from rbee_keeper.validation import validate_queen_address


def resolve_queen_key(cli_value: str | None, address: str) -> tuple[str, str]:
    if cli_value:
        return cli_value, "--api-key"
    settings = keeper_settings()
    if settings.queen_api_key:
        return settings.queen_api_key, settings.source("queen_api_key")
    key_file = rbee_home() / "queen.key"
    if key_file.exists():
        return read_key_file(key_file, "queen.key"), str(key_file)
    raise RbeeError(
        "MISSING_API_KEY",
        f"No API key for the queen at {address}",
        {"address": address, "looked_in": f"--api-key, RBEE_QUEEN_API_KEY, [keeper] queen_api_key, {key_file}"},
        [
            "Start the queen on this machine (`queen-rbee daemon`): it writes its key where rbee-keeper finds it",
            "Or pass --api-key KEY, or set RBEE_QUEEN_API_KEY",
        ],
    )


class QueenClient(DaemonClient):
    what = "the queen"
    update_hint = ("Update the queen to this release and restart it: in its checkout `git pull && make setup`, "
                   "then `queen-rbee daemon`")
    identity = QUEEN_NAME

    def _bind(self, channel) -> None:
        self._nodes = nodes_pb2_grpc.NodeServiceStub(channel)
        self._tasks = tasks_pb2_grpc.TaskServiceStub(channel)
        self._cluster = tasks_pb2_grpc.ClusterWorkerServiceStub(channel)
        self._keys = keys_pb2_grpc.AppKeyServiceStub(channel)
        self._replicas = replicas_pb2_grpc.ReplicaServiceStub(channel)

    def unreachable_hints(self) -> list[str]:
        return [f"Start it with `queen-rbee daemon --port {self.address.rpartition(':')[2]}`, or pass --queen HOST:PORT"]

    @classmethod
    def connect(cls, queen: str, api_key: str | None) -> "QueenClient":
        address = validate_queen_address(queen)
        key, source = resolve_queen_key(api_key, address)
        return cls(address, key, source)

    def translate(self, err: RbeeError) -> RbeeError:
        if err.code == "UNAVAILABLE" and "grpc_status" in err.details:  # nothing answered
            return RbeeError(
                "UNAVAILABLE",
                f"Cannot reach the queen at {self.address}",
                {"queen": self.address},
                self.unreachable_hints(),
            )
        return err

    def add_node(self, request: nodes_pb2.AddNodeRequest) -> AsyncIterator[nodes_pb2.NodeEvent]:
        return self._stream(self._nodes.AddNode, request)

    def update_node(self, request: nodes_pb2.UpdateNodeRequest) -> AsyncIterator[nodes_pb2.NodeEvent]:
        return self._stream(self._nodes.UpdateNode, request)

    async def remove_node(self, name: str) -> nodes_pb2.RemoveNodeResponse:
        return await self._unary(self._nodes.RemoveNode, nodes_pb2.RemoveNodeRequest(name=name), 120.0)

    async def list_nodes(self) -> list[nodes_pb2.Node]:
        return list((await self._unary(self._nodes.ListNodes, nodes_pb2.ListNodesRequest())).nodes)

    def install_node(self, name: str) -> AsyncIterator[nodes_pb2.NodeEvent]:
        return self._stream(self._nodes.InstallNode, nodes_pb2.InstallNodeRequest(name=name))

    def check_node(self, name: str, ssh_only: bool = False) -> AsyncIterator[nodes_pb2.NodeEvent]:
        return self._stream(self._nodes.CheckNode, nodes_pb2.CheckNodeRequest(name=name, ssh_only=ssh_only))

    async def node_access(self, name: str) -> nodes_pb2.GetNodeAccessResponse:
        return await self._unary(self._nodes.GetNodeAccess, nodes_pb2.GetNodeAccessRequest(name=name))

    def submit(self, request: tasks_pb2.SubmitInferenceRequest) -> AsyncIterator[tasks_pb2.TaskEvent]:
        return self._stream(self._tasks.SubmitInference, request)

    async def fit_model(self, request: tasks_pb2.FitModelRequest) -> tasks_pb2.FitModelResponse:
        return await self._unary(self._tasks.FitModel, request)

    async def cluster_workers(self, request: tasks_pb2.ListClusterWorkersRequest) -> list[tasks_pb2.ClusterWorker]:
        return list((await self._unary(self._cluster.ListClusterWorkers, request)).workers)

    async def create_app_key(self, name: str, scope: str) -> keys_pb2.CreateAppKeyResponse:
        """``scope``: "inference" or "admin" (the caller checked it, see keys.parse_scope)."""
        request = keys_pb2.CreateAppKeyRequest(name=name, key_scope=APP_KEY_SCOPES.number(scope))
        return await self._unary(self._keys.CreateAppKey, request)

    async def list_app_keys(self) -> list[keys_pb2.AppKey]:
        return list((await self._unary(self._keys.ListAppKeys, keys_pb2.ListAppKeysRequest())).keys)

    async def revoke_app_key(self, name: str) -> keys_pb2.AppKey:
        return (await self._unary(self._keys.RevokeAppKey, keys_pb2.RevokeAppKeyRequest(name=name))).key

    async def deploy_model(self, request: replicas_pb2.DeployModelRequest) -> replicas_pb2.DeployModelResponse:
        return await self._unary(self._replicas.DeployModel, request)

    async def undeploy_model(self, model_ref: str) -> replicas_pb2.UndeployModelResponse:
        return await self._unary(self._replicas.UndeployModel, replicas_pb2.UndeployModelRequest(model_ref=model_ref), 120.0)

    async def list_deployments(self) -> list[replicas_pb2.Deployment]:
        return list((await self._unary(self._replicas.ListDeployments, replicas_pb2.ListDeploymentsRequest())).deployments)
