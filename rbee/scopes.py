"""Which key opens which RPC (S13): the one table.

Every RPC of every rbee service needs a key of one scope:

- ``admin``: the daemon's own key. The hive's is the node key the queen
  generated (spawn, stop, provision, models, logs, watch); the queen's is
  queen.key (nodes and tasks: a task starts workers, so submitting one is
  admin of the cluster); a worker's is a key its hive generated at spawn and
  holds alone (Shutdown), so the inference key a keeper receives cannot stop
  the worker.
- ``inference``: one worker's key, the one the queen hands the keeper of a
  task: that worker's readiness, loading progress, Generate and Cancel.
- ``callback``: the key a hive gives one worker to report to it.

Health (``grpc.health.v1``) and the queen's enrolment (``EnrolService``) are
open. A method missing from the table is refused whatever the key (default deny); tests/unit/test_scopes.py walks the
generated service descriptors so a new RPC cannot be left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Scope(StrEnum):
    ADMIN = "admin"
    INFERENCE = "inference"
    CALLBACK = "callback"
    # A key this daemon knows as the admin key of another daemon (a worker's,
    # for its hive; a node's hive key, for the queen): never opens an RPC here,
    # but is named as what it is when presented.
    OTHER_ADMIN = "admin of another daemon"


# Enrolment is open too: a one-time token's secret is its credential; the
# queen serves it alone on a TLS port of its own (rbee_queen/enrol.py).
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/rbee.v1.EnrolService/")

A, I, C = Scope.ADMIN, Scope.INFERENCE, Scope.CALLBACK

# "/package.Service/Method" -> the scope whose key opens it.
METHOD_SCOPES: dict[str, Scope] = {
    # llm-worker-rbee
    "/rbee.v1.InferenceService/GetReadiness": I,
    "/rbee.v1.InferenceService/StreamLoadingProgress": I,
    "/rbee.v1.InferenceService/Generate": I,
    "/rbee.v1.InferenceService/Cancel": I,
    "/rbee.v1.InferenceService/GetModelInfo": I,
    "/rbee.v1.InferenceService/GetLoad": I,
    "/rbee.v1.InferenceService/Shutdown": A,
    "/rbee.v1.InferenceService/Sleep": A,
    "/rbee.v1.InferenceService/WakeUp": A,
    # rbee-hive: its workers' reports
    "/rbee.v1.WorkerCallbackService/ReportWorker": C,
    # rbee-hive: everything else is the node's administration
    "/rbee.v1.HiveWorkerService/SpawnWorker": A,
    "/rbee.v1.HiveWorkerService/FollowWorker": A,
    "/rbee.v1.HiveWorkerService/ListWorkers": A,
    "/rbee.v1.HiveWorkerService/CheckWorkersHealth": A,
    "/rbee.v1.HiveWorkerService/ShutdownWorker": A,
    "/rbee.v1.HiveWorkerService/SleepWorker": A,
    "/rbee.v1.HiveWorkerService/StartWorker": A,
    "/rbee.v1.HiveWorkerService/GetWorkerAccess": A,
    "/rbee.v1.HiveWorkerService/WatchWorkers": A,
    "/rbee.v1.HiveWorkerService/StreamLogs": A,
    "/rbee.v1.PreflightService/GetHiveHealth": A,
    "/rbee.v1.PreflightService/GetBackends": A,
    "/rbee.v1.PreflightService/GetResources": A,
    "/rbee.v1.PreflightService/CheckWorkerResources": A,
    "/rbee.v1.ProvisioningService/DownloadModel": A,
    "/rbee.v1.ProvisioningService/ListModels": A,
    "/rbee.v1.ProvisioningService/RemoveModel": A,
    "/rbee.v1.ProvisioningService/ListWorkerEnvironments": A,
    "/rbee.v1.ProvisioningService/ProvisionWorker": A,
    # queen-rbee
    "/rbee.v1.NodeService/AddNode": A,
    "/rbee.v1.NodeService/UpdateNode": A,
    "/rbee.v1.NodeService/RemoveNode": A,
    "/rbee.v1.NodeService/ListNodes": A,
    "/rbee.v1.NodeService/InstallNode": A,
    "/rbee.v1.NodeService/CheckNode": A,
    "/rbee.v1.NodeService/GetNodeAccess": A,
    "/rbee.v1.TaskService/SubmitInference": A,
    "/rbee.v1.TaskService/FitModel": A,
    "/rbee.v1.ClusterWorkerService/ListClusterWorkers": A,
    "/rbee.v1.AppKeyService/CreateAppKey": A,
    "/rbee.v1.AppKeyService/ListAppKeys": A,
    "/rbee.v1.AppKeyService/RevokeAppKey": A,
    "/rbee.v1.ReplicaService/DeployModel": A,
    "/rbee.v1.ReplicaService/UndeployModel": A,
    "/rbee.v1.ReplicaService/ListDeployments": A,
}

# Which program serves which service (the table's tests start each one).
SERVICES: dict[str, str] = {
    "rbee.v1.InferenceService": "worker",
    "rbee.v1.WorkerCallbackService": "hive",
    "rbee.v1.HiveWorkerService": "hive",
    "rbee.v1.PreflightService": "hive",
    "rbee.v1.ProvisioningService": "hive",
    "rbee.v1.NodeService": "queen",
    "rbee.v1.TaskService": "queen",
    "rbee.v1.ClusterWorkerService": "queen",
    "rbee.v1.AppKeyService": "queen",
    "rbee.v1.ReplicaService": "queen",
}


def is_open(method: str) -> bool:
    return method.startswith(OPEN_PREFIXES)


def required_scope(method: str) -> Scope | None:
    """The scope ``method`` needs; None when the table does not name it."""
    return METHOD_SCOPES.get(method)


def methods_of(daemon: str) -> Iterable[str]:
    for method in METHOD_SCOPES:
        if SERVICES.get(method.split("/")[1]) == daemon:
            yield method
