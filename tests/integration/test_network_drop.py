"""A network that drops mid-stream (docs/behaviour.md S9): the link between
the keeper and a worker starts swallowing every byte in both directions while
both ends keep their sockets open, as a pulled cable or a black-holing
firewall does. The keeper notices through its keepalive pings (within 5 s),
not through the 60 s stall timeout, and saves the partial answer.

The worker is the real llm-worker-rbee program on a fake engine that streams
a token every 0.2 s; the keeper is the installed console script; between them
a TCP relay on 127.0.0.1 that the test turns into a black hole.
"""

from __future__ import annotations

import re
import select
import time
import socket
import threading
from pathlib import Path

from rbee.channel import CHANNEL_OPTIONS
from tests.fixtures.keeper import KeeperProcess, keeper_env
from tests.unit.worker.test_program import KEY, fake_worker


class BlackHoleRelay:
    """Relays TCP connections to ``target`` until ``black_hole()``; from then
    on it reads and discards everything, both ways, without closing."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.holed = threading.Event()
        self.stopped = threading.Event()
        self.swallowed = 0
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            ready, _, _ = select.select([self.listener], [], [], 0.2)
            if not ready:
                continue
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed under us at the end
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        while not self.stopped.is_set():
            ready, _, _ = select.select([a, b], [], [], 0.2)
            for sock in ready:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                if self.holed.is_set():
                    self.swallowed += len(data)
                else:
                    peer[sock].sendall(data)

    def black_hole(self) -> None:
        self.holed.set()

    def close(self) -> None:
        self.stopped.set()
        for sock in self.sockets:
            sock.close()


async def test_a_dropped_network_mid_stream_is_noticed_and_the_partial_answer_saved(tmp_path: Path) -> None:
    async with fake_worker(tmp_path, FAKE_ENGINE_MODE="slow", FAKE_ENGINE_DELAY="0.2") as worker:
        await worker.wait_loaded()
        relay = BlackHoleRelay(("127.0.0.1", worker.port))
        home = tmp_path / "keeper"
        env = keeper_env(home, RBEE_TLS="off")
        try:
            # The stall timeout is far beyond the test's wait: only the
            # keepalive can end this stream in time.
            keeper = KeeperProcess(
                ["infer", "--worker", f"127.0.0.1:{relay.port}", "--api-key", KEY, "--prompt", "hi",
                 "--max-tokens", "2000", "--stall-timeout", "600"], env)  # fmt: skip
            try:
                keeper.wait_for_stdout(min_chars=12, timeout=120)
                relay.black_hole()
                holed_at = time.monotonic()
                code = keeper.finish(timeout=120)
                # A figure for the reader, not an assertion (shared machines are noisy).
                print(f"the keeper gave up {time.monotonic() - holed_at:.1f} s after the network dropped")
            finally:
                keeper.kill()
        finally:
            relay.close()
    err = keeper.stderr
    assert code == 1, keeper.describe()
    assert relay.swallowed > 0, "nothing crossed the black hole: the keeper never pinged"
    assert "STREAM_STALLED" not in err and "STREAM_BROKEN" in err, err
    saved = re.search(r"partial result: (\S+)", err)
    assert saved, err
    text = Path(saved.group(1)).read_text()
    assert text and keeper.stdout.startswith(text.strip()[:10]), (text, keeper.stdout)


def test_the_keepalive_notices_a_dead_link_within_5_s() -> None:
    options = dict(CHANNEL_OPTIONS)
    assert options["grpc.keepalive_time_ms"] + options["grpc.keepalive_timeout_ms"] <= 5_000
    assert options["grpc.http2.ping_timeout_ms"] <= options["grpc.keepalive_timeout_ms"]
    assert options["grpc.keepalive_permit_without_calls"] == 1
