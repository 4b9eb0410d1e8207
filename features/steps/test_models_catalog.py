"""Steps for models_catalog.feature (S5.1): a real hive, the test hub, rbee-keeper."""

from __future__ import annotations

from pytest_bdd import scenarios

from features.steps.models_steps import *  # noqa: F401,F403 - the shared S5 steps

scenarios("models_catalog.feature")
