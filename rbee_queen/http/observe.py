"""What the front door tells observers (metrics) about each request. The
default observer does nothing; the queen may set ``app.state.observer`` to
one that records. Labels are bounded: ``model`` is a reference the cluster
knows (an unknown name never gets this far) and ``node`` a registered node."""

from __future__ import annotations


class ProxyObserver:
    def request_started(self, route: str, model: str, node: str) -> None:
        """A request got a worker (or waits on a cold start on ``node``)."""

    def first_token(self, route: str, model: str, node: str, seconds: float) -> None:
        """Time from the request's arrival to its first token."""

    def tokens(self, route: str, model: str, node: str, count: int, seconds_since_last: float) -> None:
        """``count`` tokens arrived, ``seconds_since_last`` after the previous ones."""

    def request_finished(self, route: str, model: str, node: str, status: int, seconds: float,
                         prompt_tokens: int, completion_tokens: int) -> None:  # fmt: skip
        """The request ended with ``status`` (the HTTP status, or the error's for a stream cut short)."""

    def request_refused(self, route: str, status: int) -> None:
        """A request that ended before a model and node were known (auth, bad body, unknown model)."""
