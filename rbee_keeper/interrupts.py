"""Ctrl+C for keeper commands: the first press lets the running step finish
its business (cancel the request, wait for the acknowledgement), a second one
quits at once. Exit code 130 either way."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from rbee.narration import Narrator

EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """The user pressed Ctrl+C; the command ends with exit code 130."""


class Interrupts:
    """First Ctrl+C sets an event the running step reacts to (cancel the
    request, wait for the acknowledgement); a second one quits at once."""

    def __init__(self, narrate: Narrator) -> None:
        self.event = asyncio.Event()
        self._narrate = narrate
        self._count = 0

    def install(self) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self.trigger)

    def uninstall(self) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)

    def trigger(self) -> None:
        self._count += 1
        if self._count == 1:
            self.event.set()
            return
        self._narrate("🛑", "second Ctrl+C: quitting now")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(EXIT_INTERRUPTED)
