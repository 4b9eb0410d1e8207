"""Backoff with jitter, shared by SSH, downloads and keeper retries."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(base_ms: int, attempts: int, jitter: float = 0.2, first_zero: bool = False) -> Iterator[float]:
    """Seconds to wait before each attempt after the first: base, 2×base, 4×base, …

    ``jitter`` spreads each delay by ±that fraction so that many clients do not
    retry in lockstep. ``first_zero`` makes the first retry immediate (0, base, 2×base…).
    """
    for i in range(attempts - 1):
        if first_zero:
            nominal = 0 if i == 0 else base_ms * (2 ** (i - 1))
        else:
            nominal = base_ms * (2**i)
        spread = nominal * jitter
        yield max(0.0, (nominal + random.uniform(-spread, spread)) / 1000.0)
