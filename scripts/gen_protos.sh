#!/usr/bin/env bash
# Generate the Python stubs (with mypy stubs) for protos/rbee/v1/*.proto into rbee/v1/.
# The include root is protos/, so the proto package rbee.v1 is the Python import path.
# With --check: generate into a scratch folder and fail if the committed stubs differ.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_BIN="${VENV_BIN:-.venv/bin}"
out="."
if [ "${1:-}" = "--check" ]; then
    out="$(mktemp -d)"
    trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out/rbee/v1"
PATH="$VENV_BIN:$PATH" "$VENV_BIN/python" -m grpc_tools.protoc \
    -I protos \
    --python_out="$out" --grpc_python_out="$out" \
    --mypy_out="$out" --mypy_grpc_out="$out" \
    protos/rbee/v1/*.proto
if [ "$out" != "." ]; then
    status=0
    for f in "$out"/rbee/v1/*; do
        name="rbee/v1/$(basename "$f")"
        if ! cmp -s "$f" "$name"; then
            echo "protos-check: $name differs from what protos/ generates; run 'make protos' and commit" >&2
            status=1
        fi
    done
    for f in rbee/v1/*_pb2*.py*; do
        [ -e "$out/$f" ] || { echo "protos-check: $f has no .proto source any more" >&2; status=1; }
    done
    [ $status -eq 0 ] && echo "protos-check: generated stubs match protos/"
    exit $status
fi
echo "generated rbee/v1 stubs from protos/rbee/v1"
