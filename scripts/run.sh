#!/usr/bin/env bash
# `make run`: start a worker on the default model, stream an answer to a
# built-in prompt through `rbee-keeper infer --worker`, stop the worker.
# (The Makefile has set up .venv and fetched the model before this runs.)
#
# Overridable: RBEE_RUN_PROMPT, RBEE_RUN_MAX_TOKENS, RBEE_RUN_MODEL, RBEE_HOME.
# The worker's log goes to $RBEE_HOME/logs/make-run-worker-PORT.log.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
PY="$BIN/python"

say() { printf '[make-run] %s\n' "$*" >&2; }
die() { printf '[make-run] ❌ %s\n' "$*" >&2; exit 1; }

[ -x "$BIN/llm-worker-rbee" ] && [ -x "$BIN/rbee-keeper" ] || die "rbee is not installed in .venv: run \`make setup\`"

MODEL="${RBEE_RUN_MODEL:-$("$PY" -c 'from rbee.config import default_model_path; print(default_model_path())')}"
PROMPT="${RBEE_RUN_PROMPT:-In two sentences, what do honey bees do all day?}"
MAX_TOKENS="${RBEE_RUN_MAX_TOKENS:-64}"
LOGS="$("$PY" -c 'from rbee.config import logs_dir; print(logs_dir())')"
[ -f "$MODEL/config.json" ] || die "model not found at $MODEL: run \`make model\`"
mkdir -p "$LOGS"

worker_pid=""
keeper_pid=""

# Stop the worker whatever happened: Shutdown RPC first (it drains and
# unloads), SIGTERM if that is refused, then SIGKILL to its whole process
# group (the engine runs in child processes) after a bounded wait.
stop_worker() {
    [ -n "$worker_pid" ] || return 0
    if kill -0 "$worker_pid" 2>/dev/null; then
        say "🛑 stopping the worker (pid $worker_pid)"
        RBEE_API_KEY="$key" "$PY" - "127.0.0.1:$port" <<'EOF' >/dev/null 2>&1 || kill -TERM "$worker_pid" 2>/dev/null
import asyncio, os, sys
from rbee_keeper.worker_client import WorkerClient

async def main() -> None:
    async with WorkerClient(sys.argv[1], os.environ["RBEE_API_KEY"], "RBEE_API_KEY") as client:
        await client.shutdown(drain_timeout_s=5, timeout=10)

asyncio.run(main())
EOF
        # `tail --pid` returns when the process is gone (no sleep loop here).
        if ! timeout 40 tail --pid="$worker_pid" -f /dev/null; then
            say "⚠️ worker did not exit within 40s: killing it"
        fi
    fi
    # Whatever is left of its process group (engine processes) goes too.
    kill -KILL -- "-$worker_pid" 2>/dev/null
    wait "$worker_pid" 2>/dev/null
    say "✅ worker stopped, nothing of it left running"
    worker_pid=""
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "$keeper_pid" ] && kill -INT "$keeper_pid" 2>/dev/null && wait "$keeper_pid" 2>/dev/null
    stop_worker
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' TERM

free_port() {
    "$PY" - "$1" <<'EOF'
import socket, sys
from rbee.config import DEFAULT_WORKER_PORT_END
for port in range(int(sys.argv[1]), DEFAULT_WORKER_PORT_END + 1):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(port)
        break
else:
    sys.exit(1)
EOF
}

key="$("$PY" -c 'from rbee.auth import new_api_key; print(new_api_key())')"
port="$(free_port "$("$PY" -c 'from rbee.config import DEFAULT_WORKER_PORT_START as p; print(p)')")" \
    || die "no free port for the worker between 7910 and 7999"
log="$LOGS/make-run-worker-$port.log"

say "🐝 starting llm-worker-rbee on 127.0.0.1:$port with $MODEL (cpu, device 0)"
say "📄 worker log: $log"
# Own session and process group: a Ctrl+C in this terminal reaches the keeper
# (which cancels its request) but not the worker, which is stopped above.
RBEE_WORKER_API_KEY="$key" setsid "$BIN/llm-worker-rbee" \
    --model "$MODEL" --backend cpu --device 0 --port "$port" >"$log" 2>&1 </dev/null &
worker_pid=$!

say "💬 prompt: $PROMPT"
# The keeper waits for the server to come up and for the model to load,
# showing progress, then streams the answer to stdout.
RBEE_API_KEY="$key" "$BIN/rbee-keeper" infer \
    --worker "127.0.0.1:$port" --prompt "$PROMPT" --max-tokens "$MAX_TOKENS" --temperature 0.7 \
    --connect-timeout 120 &
keeper_pid=$!

# A Ctrl+C reaches the keeper directly (same process group); here it only
# interrupts `wait`, which is then resumed until the keeper has finished.
trap ':' INT
keeper_rc=""
while [ -z "$keeper_rc" ]; do
    wait -n -p finished "$keeper_pid" "$worker_pid"
    rc=$?
    if [ "${finished:-}" = "$keeper_pid" ]; then
        keeper_rc=$rc
        keeper_pid=""
    elif [ "${finished:-}" = "$worker_pid" ]; then
        say "❌ the worker exited (code $rc) before the answer was complete; its last log lines:"
        tail -n 20 "$log" >&2
        worker_pid=""
        kill -TERM "$keeper_pid" 2>/dev/null
        wait "$keeper_pid" 2>/dev/null
        keeper_pid=""
        exit 1
    fi
    unset finished
done
trap 'exit 130' INT

if [ "$keeper_rc" -eq 130 ]; then
    say "🛑 interrupted"
    exit 130
elif [ "$keeper_rc" -ne 0 ]; then
    say "❌ rbee-keeper exited with $keeper_rc; the worker's log is $log"
    exit "$keeper_rc"
fi
stop_worker
say "✅ done"
