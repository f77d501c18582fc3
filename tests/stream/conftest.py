"""Fixtures for the stream tests: one guard engine on the trained tiny checkpoint for the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import load_settings
from worker.engine.engine import GuardEngine


@pytest.fixture(scope="session")
def engine_settings_overrides(tiny_model_dir: Path) -> dict[str, object]:
    """Settings overrides that point a worker at the trained tiny checkpoint."""
    return {"model__path": str(tiny_model_dir), "model__device": "cpu"}


@pytest.fixture(scope="session")
def guard_engine(engine_settings_overrides: dict[str, object]) -> GuardEngine:
    """The real engine on the trained tiny checkpoint (loaded once; shared by the stream tests)."""
    return GuardEngine.from_settings(load_settings(None, **engine_settings_overrides))
