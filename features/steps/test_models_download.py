"""Steps for models_download.feature (S5.2): a real hive, the test hub, rbee-keeper."""

from __future__ import annotations

from pytest_bdd import scenarios

from features.steps.models_steps import *  # noqa: F401,F403 - the shared S5 steps

scenarios("models_download.feature")
