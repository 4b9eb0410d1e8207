"""`rbee-hive daemon` (the node's persistent server) and `rbee-hive detect`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from rbee.cli_common import EXIT_ERROR, print_error, run_daemon
from rbee.errors import RbeeError

ACTOR = "rbee-hive"


def daemon(
    port: int = typer.Option(None, "--port", help="Port of the gRPC server (default 7900; RBEE_HIVE_PORT)."),
    host: str = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1; RBEE_HIVE_HOST)."),
    api_key: str = typer.Option(
        None, "--api-key", help="Key every RPC but health requires (RBEE_HIVE_API_KEY keeps it out of ps)."
    ),
    api_key_file: Path = typer.Option(
        None, "--api-key-file", help="Read the key from this file (mode 600; RBEE_HIVE_API_KEY_FILE). How the queen starts hives."
    ),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="Serve mutual TLS with this certificate chain (PEM; RBEE_HIVE_TLS_CERT). A node the queen registers gets one from its CA."),
    tls_key: Path = typer.Option(None, "--tls-key", help="The certificate's private key (PEM, mode 600; RBEE_HIVE_TLS_KEY)."),
    tls_ca: Path = typer.Option(None, "--tls-ca", help="The cluster CA: clients' and workers' certificates must chain to it (RBEE_HIVE_TLS_CA)."),
    tls_issuer_cert: Path = typer.Option(None, "--tls-issuer-cert", help="A CA certificate below the cluster CA to sign each worker's certificate with (RBEE_HIVE_TLS_ISSUER_CERT); without it workers serve with the hive's own."),
    tls_issuer_key: Path = typer.Option(None, "--tls-issuer-key", help="The issuing certificate's key (mode 600; RBEE_HIVE_TLS_ISSUER_KEY)."),
    insecure: bool = typer.Option(None, "--insecure", help="Allow listening beyond loopback without TLS: keys and tokens cross the network in clear (RBEE_HIVE_INSECURE)."),
    stdout_log: Path = typer.Option(None, "--stdout-log", help="The file this hive's stdout and stderr are redirected into (as the queen starts hives: logs/hive.log); the hive rotates it at log_max_bytes like its other logs (RBEE_HIVE_STDOUT_LOG)."),
    worker_binary: Path = typer.Option(None, "--worker-binary", help="Use this worker program instead of a provisioned worker environment (default: the environment for the backend in $RBEE_HOME/workers, installed on first use; RBEE_HIVE_WORKER_BINARY)."),
) -> None:
    """Run the hive: preflight, worker spawning and supervision over gRPC. Stops its workers on SIGTERM."""
    from rbee_hive.server import serve
    from rbee_hive.settings import load_settings

    # Whatever the hive and its workers create (models, environments, logs,
    # catalogs) is the hive user's alone (S13); the named files are also
    # created 0600/0700 explicitly, this covers the rest.
    os.umask(0o077)
    if api_key:
        from rbee.auth import argv_key_warning
        from rbee.narration import Narrator

        Narrator(ACTOR)("⚠️", argv_key_warning("RBEE_HIVE_API_KEY", "--api-key-file"), "warn")
    async def main() -> int:
        settings = load_settings(
            port=port, host=host, api_key=api_key, api_key_file=api_key_file, worker_binary=worker_binary,
            tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, tls_issuer_cert=tls_issuer_cert,
            tls_issuer_key=tls_issuer_key, insecure=insecure, stdout_log=stdout_log,
        )
        return await serve(settings)

    run_daemon(ACTOR, main)


def detect_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print only the registry form, as JSON."),
) -> None:
    """Print the backends and device counts of this node (human and registry form)."""
    from rbee_hive.detect import detect
    from rbee_hive.resources import resource_source
    from rbee_hive.settings import load_settings

    try:
        settings = load_settings()
        detection = detect(resource_source(settings.resource_overrides))
    except RbeeError as err:
        print_error(err, ACTOR)
        raise typer.Exit(EXIT_ERROR) from None
    if as_json:
        typer.echo(json.dumps(detection.registry_form()))
        return
    for line in detection.human_lines():
        typer.echo(line)
    typer.echo("")
    for line in detection.registry_lines():
        typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command("daemon")(daemon)
    app.command("detect")(detect_cmd)
