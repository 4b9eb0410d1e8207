#!/usr/bin/env bash
# `make run`: the whole system on this machine, the way a user drives it.
#   1. a persistent queen (queen-rbee daemon) on a free port,
#   2. this machine registered as a node (setup add-node --local),
#   3. a cold-start `infer` on the default model as a file: reference (the
#      queen starts the node's hive, which registers the model in its catalog,
#      prepares the worker environment and spawns a worker),
#   4. a warm-start `infer` (the idle worker is reused),
#   5. one streamed chat completion through the queen's OpenAI-compatible
#      HTTP port (curl, the queen's key), as any OpenAI client would ask,
#   6. the timings, then the queen stopped: it stops the hive it started,
#      which stops its worker; nothing is left running.
# The answers go to stdout; narration and the timings to stderr, as
# "[make-run] ..." lines; `make run > run.log 2>&1` keeps the whole run.
# (The Makefile has set up .venv and fetched the model before this runs.)
#
# Overridable: RBEE_RUN_PROMPT, RBEE_RUN_MAX_TOKENS, RBEE_RUN_MODEL, RBEE_HOME.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
PY="$BIN/python"

say() { printf '[make-run] %s\n' "$*" >&2; }
die() { printf '[make-run] ❌ %s\n' "$*" >&2; exit 1; }

[ -x "$BIN/queen-rbee" ] && [ -x "$BIN/rbee-keeper" ] || die "rbee is not installed in .venv: run \`make setup\`"

MODEL="${RBEE_RUN_MODEL:-$("$PY" -c 'from rbee.config import default_model_path; print(default_model_path())')}"
PROMPT="${RBEE_RUN_PROMPT:-In two sentences, what do honey bees do all day?}"
MAX_TOKENS="${RBEE_RUN_MAX_TOKENS:-48}"
LOGS="$("$PY" -c 'from rbee.config import logs_dir; print(logs_dir())')"
[ -f "$MODEL/config.json" ] || die "model not found at $MODEL: run \`make model\`"
mkdir -p "$LOGS"
NODE=this-machine

free_port() {
    "$PY" - "$1" <<'EOF'
import socket, sys
start = int(sys.argv[1])
for port in range(start, start + 100):
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

queen_port="$(free_port 7800)" || die "no free port for the queen from 7800"
hive_port="$(free_port 7900)" || die "no free port for the hive from 7900"
http_port="$(free_port 8080)" || die "no free port for the queen's HTTP API from 8080"
QUEEN="127.0.0.1:$queen_port"
queen_log="$LOGS/make-run-queen.log"
queen_pid=""

keeper() { "$BIN/rbee-keeper" "$@" --queen "$QUEEN"; }

stop_queen() {
    [ -n "$queen_pid" ] || return 0
    if kill -0 "$queen_pid" 2>/dev/null; then
        say "🛑 stopping the queen (it stops the hive it started, which stops its worker)"
        kill -TERM "$queen_pid" 2>/dev/null
        if ! timeout 120 tail --pid="$queen_pid" -f /dev/null; then
            say "⚠️ the queen did not stop within 120s: killing it"
            kill -KILL -- "-$queen_pid" 2>/dev/null
        fi
    fi
    wait "$queen_pid" 2>/dev/null
    queen_pid=""
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    stop_queen
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

say "👑 starting a persistent queen on $QUEEN, its OpenAI-compatible API on http://127.0.0.1:$http_port/v1 (log: $queen_log)"
setsid "$BIN/queen-rbee" daemon --port "$queen_port" --http-port "$http_port" >"$queen_log" 2>&1 </dev/null &
queen_pid=$!
for _ in $(seq 100); do
    "$PY" - "$QUEEN" <<'EOF' && break
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as ch:
    try:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.5, wait_for_ready=True)
    except grpc.RpcError:
        sys.exit(1)
EOF
    kill -0 "$queen_pid" 2>/dev/null || { tail -n 20 "$queen_log" >&2; die "the queen exited"; }
done

if keeper setup list-nodes --json 2>/dev/null | grep -q "\"name\": \"$NODE\""; then
    say "🔁 node $NODE is registered already: pointing it at hive port $hive_port"
    keeper setup update-node --name "$NODE" --hive-port "$hive_port" >/dev/null || die "could not update node $NODE"
else
    say "📝 registering this machine as node $NODE"
    keeper setup add-node --name "$NODE" --local --hive-port "$hive_port" >/dev/null || die "could not register node $NODE"
fi

# The answer streams to stdout; narration and the timing go to stderr as
# narration lines. No `tee /dev/stderr`: reopening stderr's file truncates a
# log redirected with `> run.log 2>&1`.
elapsed=""
run_infer() {
    local label=$1 started ended
    say "💬 $label: $PROMPT"
    started=$(date +%s.%N)
    keeper infer --node "$NODE" --model "file://$MODEL" --prompt "$PROMPT" --max-tokens "$MAX_TOKENS" --temperature 0.7 || return $?
    echo
    ended=$(date +%s.%N)
    elapsed="$("$PY" -c "print(f'{$ended - $started:.1f}')")"
}

run_infer "cold start (hive, model registration, worker environment, engine start)" \
    || die "the cold-start infer failed; the queen's log is $queen_log"
cold_s=$elapsed
run_infer "warm start (the idle worker is reused)" \
    || die "the warm-start infer failed; the queen's log is $queen_log"
warm_s=$elapsed

# The same worker through the queen's HTTP front door, as an OpenAI client
# (a chat UI, the openai library) would ask: SSE chunks, then [DONE].
HOME_DIR="$("$PY" -c 'from rbee.config import rbee_home; print(rbee_home())')"
say "🌐 one streamed chat completion through http://127.0.0.1:$http_port/v1/chat/completions (curl)"
"$PY" -c 'import json, sys; print(json.dumps({"model": "file://" + sys.argv[1], "stream": True, "temperature": 0.7,
    "max_tokens": int(sys.argv[3]), "messages": [{"role": "user", "content": sys.argv[2]}]}))' \
    "$MODEL" "$PROMPT" "$MAX_TOKENS" >"$LOGS/make-run-chat.json"
curl -sS -N --fail-with-body "http://127.0.0.1:$http_port/v1/chat/completions" \
    -H "Authorization: Bearer $(cat "$HOME_DIR/queen.key")" -H "Content-Type: application/json" \
    --data @"$LOGS/make-run-chat.json" \
    || die "the streamed chat completion through the HTTP API failed; the queen's log is $queen_log"
echo

keeper workers list >&2
say "⏱️  cold start: ${cold_s}s end to end · warm start: ${warm_s}s end to end"
stop_queen
left="$(pgrep -f -- "rbee-hive daemon .*--port $hive_port|--callback 127.0.0.1:$hive_port" || true)"
[ -z "$left" ] || die "processes still running after the queen stopped: $left"
say "✅ done: queen, hive and worker stopped, nothing left running"
