"""Fixtures shared by tests/ and features/ (each area keeps its own module)."""

pytest_plugins = [
    "tests.fixtures.common",
    "tests.fixtures.worker",
    "tests.fixtures.keeper",
    "tests.fixtures.hive",
    "tests.fixtures.models",
    "tests.fixtures.queen",
    "tests.fixtures.cluster",
    "tests.fixtures.ssh",
    "tests.fixtures.browser",
]


# --- running the suite on several processes (pytest-xdist, `make test`) ------
# Tests stay together per file (module fixtures and the order inside a file
# hold). Every file that starts the real vLLM engine, or uses the session's
# shared engines (real_worker, the front door's cluster), forms one group run
# by one process in order: the shared engines start once per run, and two
# engine starts never compete for the cores. That group is collected first so
# it starts at once while the other process works through the rest.
import signal  # noqa: E402

import pytest  # noqa: E402

ENGINE_FIXTURES = {"real_worker", "cluster", "solo_worker", "start_worker", "reference", "the_shared_worker"}
# Files whose hives spawn real engine workers (no fixture says so).
ENGINE_FILES = {
    "test_engine_oom.py", "test_hive_features.py", "test_tls_links.py", "test_worker_sandbox.py",
    "test_worker_tokenizer_health.py", "test_models_downloads.py", "test_hive_real_worker.py",
}


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background of a non-interactive shell inherits
    # SIGINT ignored, and so would every program a test starts: the tests of
    # Ctrl-C would hang. A handler here is reset to the default in children.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the items
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.pluginmanager.get_plugin("xdist") is None or not getattr(config.option, "numprocesses", None):
        if not hasattr(config, "workerinput"):
            return
    engine = {
        item.path for item in items
        if item.get_closest_marker("engine") or ENGINE_FIXTURES & set(getattr(item, "fixturenames", ()))
        or item.path.name in ENGINE_FILES
    }  # fmt: skip
    for item in items:
        group = "engine" if item.path in engine else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))
        # xdist sends a group to one process by the "@group" ending it gives
        # each node id; pytest 9 keeps the id where xdist 3.8 does not write.
        if hasattr(item, "_id") and not hasattr(item, "_nodeid"):
            from _pytest.nodeid import coerce_node_id

            item._id = coerce_node_id(f"{item.nodeid}@{group}")
    items.sort(key=lambda item: item.path not in engine)  # stable: the order inside each group holds
