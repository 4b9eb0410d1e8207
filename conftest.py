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
