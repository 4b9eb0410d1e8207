"""What a worker's launch needs before its process starts: its command-line
arguments, a certificate of its own (mutual TLS, docs/security.md), the cores
it runs on, a private temp folder and its sandbox environment; and the
clean-up of all of that when it is gone."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from rbee.cpus import format_cpu_list
from rbee.errors import RbeeError
from rbee.tls import CA_CERT, TLS_DIR, Issuer, san_hosts, write_identity
from rbee.tls_identity import identity_of, worker_identity

from rbee_hive.settings import HiveSettings
from rbee_hive.workers import sandbox
from rbee_hive.workers.cores import Assignment, hive_cores
from rbee_hive.workers.environment import worker_environment
from rbee_hive.workers.registry import WorkerRecord
from rbee_hive.workers.spec import SpawnSpec
from rbee_worker.sleep import ENV_SLEEP_MODE


class LaunchPreparation:
    """The hive's TLS identity and issuer, its core assigner and each worker's
    temp folder; one per hive, owned by the WorkerManager."""

    def __init__(self, settings: HiveSettings, callback_address: Callable[[], str]) -> None:
        self.settings = settings
        self._callback_address = callback_address
        self._worker_tmps: dict[str, Path] = {}
        # Each CPU worker's own cores (rbee_hive/workers/cores.py).
        self.cores = hive_cores(settings.worker_cores)
        # Mutual TLS (docs/security.md): the hive's identity (its calls to workers present
        # it) and what signs each worker's certificate of its own (the hive's
        # issuing certificate). Never the hive's own certificate: a worker
        # holding hive.key could pass for its hive.
        self.tls = settings.tls_identity()
        self.worker_issuer = (
            Issuer.load(settings.tls_issuer_cert, settings.tls_issuer_key)
            if self.tls and settings.tls_issuer_cert and settings.tls_issuer_key
            else None
        )
        if self.tls and self.worker_issuer is None:
            # A worker calls its hive back over the hive's mutual TLS, so it
            # needs a certificate, and the hive's own is never handed out.
            raise RbeeError(
                "TLS_REQUIRED",
                "rbee-hive serves mutual TLS but has no issuing certificate to give each worker a certificate of its own",
                {"flag": "--tls-issuer-cert"},
                [
                    "Pass --tls-issuer-cert and --tls-issuer-key (a node the queen registers gets them from its CA)",
                    "Or serve without TLS on loopback (leave out --tls-cert, --tls-key and --tls-ca; --host 127.0.0.1)",
                ],
            )
        # What keeps code in a worker from the hive's keys (docs/security.md).
        self.sandbox_abi = sandbox.landlock_abi()
        # Worker certificates carry a name below the hive's identity (rbee/tls_identity.py).
        self.identity = identity_of(self.tls.certificate()) if self.tls else None

    def args(self, record: WorkerRecord, spec: SpawnSpec) -> list[str]:
        args = [
            "--model", record.model_path,
            "--backend", record.backend,
            "--device", str(record.device),
            "--host", record.host,
            "--port", str(record.port),
            "--callback", self._callback_address(),
            "--worker-id", record.id,
            "--model-ref", record.model_ref,
        ]  # fmt: skip
        if spec.slots:
            args += ["--slots", str(spec.slots)]
        if self.settings.worker_dtype != "auto":
            args += ["--dtype", self.settings.worker_dtype]
        if record.tls_dir is not None:
            args += [
                "--tls-cert", str(record.tls_dir / "tls.crt"),
                "--tls-key", str(record.tls_dir / "tls.key"),
                "--tls-ca", str(record.tls_dir / CA_CERT),
            ]  # fmt: skip
        elif self.settings.insecure:
            args.append("--insecure")
        return args

    def issue_tls(self, record: WorkerRecord) -> None:
        """The worker's own certificate (signed by the hive's issuing certificate),
        valid for the hive's addresses and a name of its own below the hive's
        identity (a hive serving TLS has an issuing certificate: checked at start)."""
        if self.tls is None or self.worker_issuer is None:
            return
        folder = self.settings.rbee_home / TLS_DIR / "workers" / record.id
        hosts = [h for h in san_hosts(self.tls.certificate()) if h != self.identity]
        if self.identity:
            record.tls_name = worker_identity(self.identity, record.id)
        issued = self.worker_issuer.issue_leaf(f"llm-worker-rbee {record.id}", [*hosts, record.host, record.tls_name])
        write_identity(folder, issued, self.tls.ca)
        record.tls_dir = folder

    def environment(self, record: WorkerRecord) -> dict[str, str]:
        """The worker's environment: its keys (in the environment, not on the
        command line, which ps shows), of the hive's own environment what the
        engine needs and never the hive's secrets, its sandbox, and sleep mode
        for a CUDA worker when ``worker_sleep_mode`` is on."""
        env = worker_environment(
            os.environ,
            {
                "RBEE_WORKER_API_KEY": record.api_key,
                "RBEE_CALLBACK_API_KEY": record.callback_key,
                "RBEE_WORKER_ADMIN_KEY": record.admin_key,
                "RBEE_HOME": str(self.settings.rbee_home),
                "PYTHONUNBUFFERED": "1",
            },
            self.settings.worker_env,
        )
        env.update(self._sandbox(record))
        if self.settings.worker_sleep_mode and record.backend == "cuda":
            env[ENV_SLEEP_MODE] = "1"  # vLLM's sleep mode, for SleepWorker (docs/hive.md)
        return env

    def assign_cores(self, record: WorkerRecord, env: dict[str, str]) -> Assignment | None:
        """A CPU worker's cores, in record.cpu_set and ``env``; None when the
        hive cannot set affinity or the worker is not on the CPU."""
        if self.cores is None or record.backend != "cpu":
            return None
        given = self.cores.assign(record.id)
        record.cpu_set = format_cpu_list(given.cores)
        env["RBEE_WORKER_CPUS"] = record.cpu_set
        return given

    def release(self, record: WorkerRecord) -> None:
        """The worker's certificate, temp folder and cores, once it is gone."""
        if record.tls_dir is not None:
            shutil.rmtree(record.tls_dir, ignore_errors=True)
        tmp = self._worker_tmps.pop(record.id, None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.cores is not None:
            self.cores.release(record.id)

    def _worker_tmp(self, record: WorkerRecord) -> Path:
        """A private temp folder of the worker's own, short: vLLM puts its IPC
        sockets there, and a Unix socket's path must stay under 108 bytes, which
        a folder deep in RBEE_HOME can pass. mkdtemp makes it 0700 with a name
        nobody could have prepared."""
        tmp = self._worker_tmps.get(record.id)
        if tmp is None:
            tmp = Path(tempfile.mkdtemp(prefix=f"rbee-{record.id}-"))
            self._worker_tmps[record.id] = tmp
        return tmp

    def _sandbox(self, record: WorkerRecord) -> dict[str, str]:
        """The worker's Landlock policy (rbee_hive/workers/sandbox.py), for the
        launcher to apply before it execs; nothing where the kernel has none."""
        if self.sandbox_abi <= 0:
            return {}
        tmp = None
        deny, _ = sandbox.worker_paths(self.settings, record.tls_dir, None)
        if sandbox.temp_is_closed(deny):
            tmp = self._worker_tmp(record)
        deny, allow = sandbox.worker_paths(self.settings, record.tls_dir, tmp)
        env = {sandbox.ENV: sandbox.policy(deny, allow)}
        if tmp is not None:
            env.update(TMPDIR=str(tmp), TMP=str(tmp), TEMP=str(tmp))
        return env
