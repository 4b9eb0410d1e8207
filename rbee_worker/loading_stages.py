"""A worker's loading stages: the ones it reports (STAGES, in order, only
ever forward: ForwardStages) and the ones it learns from inside vLLM's
engine process.

vLLM loads the weights and sizes the KV cache in a spawned engine process and
offers no progress API; it does log each stage. The worker hands that process
a logging config (``VLLM_LOGGING_CONFIG_PATH``) that keeps vLLM's console
output and adds :class:`StageHandler`, which forwards the stage records as
datagrams to a Unix socket the worker listens on. If vLLM rewords a message,
the worker only loses that intermediate stage, never the load itself.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from rbee_worker.engine import LoadProgress, ProgressCallback

ENV_SOCKET = "RBEE_WORKER_STAGE_SOCKET"

# record.msg (the unformatted template) prefix -> stage it marks.
MARKERS: tuple[tuple[str, str], ...] = (
    ("Starting to load model", "weights"),
    ("Loading weights took", "weights_loaded"),
    ("Model loading took", "weights_loaded"),
    ("%s KV cache size", "kv_cache"),
    ("init engine (profile, create kv cache, warmup model) took", "warmup_done"),
)


def stage_of(template: object) -> str | None:
    if not isinstance(template, str):
        return None
    for prefix, stage in MARKERS:
        if template.startswith(prefix):
            return stage
    return None


class StageHandler(logging.Handler):
    """Runs in vLLM's processes: sends stage records to the worker."""

    def __init__(self, level: int = logging.INFO, address: str | None = None) -> None:
        super().__init__(level)
        self._address = address if address is not None else os.environ.get(ENV_SOCKET, "")
        self._sock: socket.socket | None = None

    def emit(self, record: logging.LogRecord) -> None:
        stage = stage_of(record.msg)
        if stage is None or not self._address:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            payload = json.dumps({"stage": stage, "message": record.getMessage()}).encode()
            self._sock.sendto(payload, self._address)
        except OSError:
            # The worker may be gone or its buffer full; a lost stage is harmless.
            pass

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        super().close()


def logging_config(stream: str = "ext://sys.stdout") -> dict:
    """vLLM's console logging plus the stage handler."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "vllm": {
                "format": "(vllm pid=%(process)d) %(levelname)s %(asctime)s %(message)s",
                "datefmt": "%m-%d %H:%M:%S",
            }
        },
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "vllm", "stream": stream, "level": "INFO"},
            "stages": {"()": f"{__name__}.StageHandler", "level": "INFO"},
        },
        "loggers": {"vllm": {"handlers": ["console", "stages"], "level": "INFO", "propagate": False}},
    }


class StageListener:
    """Worker side: receives stage datagrams on the running event loop."""

    def __init__(self, on_stage: Callable[[str, str], None]) -> None:
        self._on_stage = on_stage
        self._dir = Path(tempfile.mkdtemp(prefix="rbee-worker-"))
        self.socket_path = str(self._dir / "stages.sock")
        self.config_path = str(self._dir / "vllm-logging.json")
        self._sock: socket.socket | None = None
        self._loop = None

    def start(self, loop) -> dict[str, str]:
        """Bind and start reading; returns the environment vLLM's processes need."""
        Path(self.config_path).write_text(json.dumps(logging_config()))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(self.socket_path)
        sock.setblocking(False)
        self._sock = sock
        self._loop = loop
        loop.add_reader(sock.fileno(), self._read)
        return {ENV_SOCKET: self.socket_path, "VLLM_LOGGING_CONFIG_PATH": self.config_path}

    def _read(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                msg = json.loads(data)
                self._on_stage(str(msg["stage"]), str(msg.get("message", "")))
            except (ValueError, KeyError, TypeError):
                continue

    def close(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for path in (self.socket_path, self.config_path):
            try:
                os.unlink(path)
            except OSError:
                pass
        try:
            self._dir.rmdir()
        except OSError:
            pass


# -- the stages the worker reports -------------------------------------------------

STAGES = ("tokenizer", "engine_config", "engine_start", "weights", "kv_cache", "ready")
_STAGE_INDEX = {name: i for i, name in enumerate(STAGES)}
# Child-process markers (MARKERS) -> the stage they belong to.
CHILD_STAGES = {
    "weights": "weights",
    "weights_loaded": "weights",
    "kv_cache": "kv_cache",
    "warmup_done": "kv_cache",
}


class ForwardStages:
    """Loading stages reported to ``progress`` in order: done = the stages
    completed before this one, "ready" completes them all. The engine
    process's own stage lines come over a socket and may arrive after a later
    stage (even "ready") was reported; such a late one is dropped, so the
    stages only move forward."""

    def __init__(self, progress: ProgressCallback) -> None:
        self._progress = progress
        self._reached = 0

    def __call__(self, stage: str, message: str) -> None:
        total = len(STAGES)
        done = total if stage == "ready" else _STAGE_INDEX[stage]
        if done < self._reached:
            return
        self._reached = done
        self._progress(LoadProgress(stage=stage, done=done, total=total, message=message))
