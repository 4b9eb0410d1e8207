"""The environment a worker is started with: what the engine needs, never the
hive's secrets (S13).

The hive holds its API key, maybe an ``HF_TOKEN`` and whatever else its
operator exported; a worker needs none of it. So its environment is built
from an allow-list (names and prefixes the engine, Python and the C
libraries under it read), plus the worker's own variables the hive sets, and
anything that looks like a secret is dropped even when a prefix matched.
An operator can pass more with ``worker_env`` (names, or prefixes ending in
``*``); secrets stay out there too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# Exact names worth passing on.
ALLOWED_NAMES = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM",
        "TMPDIR", "TEMP", "TMP", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR",
        "LD_LIBRARY_PATH", "LD_PRELOAD", "VIRTUAL_ENV", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
        "HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HUB_DISABLE_TELEMETRY", "HF_ENDPOINT",
        "TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE", "TOKENIZERS_PARALLELISM", "RBEE_HOME", "RBEE_CONFIG",
    }
)  # fmt: skip
# Prefixes: locale, the engine, its threading and math libraries, the GPU stack, Python.
ALLOWED_PREFIXES = (
    "LC_", "VLLM_", "OMP_", "KMP_", "MKL_", "OPENBLAS_", "GOMP_", "CUDA_", "NVIDIA_", "NCCL_", "CUBLAS_",
    "CUDNN_", "TORCH_", "PYTORCH_", "TRITON_", "PYTHON", "RBEE_WORKER_",
)  # fmt: skip
# Never passed, whatever matched: credentials of the hive or of its operator.
# Matched on whole words of the name: HF_TOKEN, RBEE_HIVE_API_KEY, AWS_SECRET_ACCESS_KEY,
# SSH_AUTH_SOCK, but not TOKENIZERS_PARALLELISM.
SECRET = re.compile(
    r"(^|_)(KEYS?|TOKENS?|SECRETS?|PASSWORDS?|PASSWD|PASSPHRASE|CREDENTIALS?|AUTH|COOKIES?)(_|$)", re.IGNORECASE
)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.endswith("*") and name.startswith(pattern[:-1]):
            return True
        if name == pattern:
            return True
    return False


def is_secret(name: str) -> bool:
    return bool(SECRET.search(name))


def worker_environment(
    base: Mapping[str, str], own: Mapping[str, str], extra: Iterable[str] = ()
) -> dict[str, str]:
    """The environment of a worker process.

    ``base`` is the hive's environment, filtered; ``own`` the worker's own
    variables (its keys, RBEE_HOME, ...), always passed; ``extra`` the
    operator's additional names or ``PREFIX*`` patterns.
    """
    extra = tuple(extra)
    env = {
        name: value
        for name, value in base.items()
        if (name in ALLOWED_NAMES or name.startswith(ALLOWED_PREFIXES) or _matches(name, extra))
        and not is_secret(name)
    }
    env.update(own)
    return env


def without_secrets(base: Mapping[str, str]) -> dict[str, str]:
    """The hive's environment minus anything that looks like a secret: for
    helper processes that need the rest (pip needs its proxy and index
    settings) but not the hive's keys."""
    return {name: value for name, value in base.items() if not is_secret(name)}
