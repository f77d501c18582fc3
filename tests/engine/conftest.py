"""Engine test fixtures: the tiny checkpoints (``tests/fixtures/tiny_model.py``, loaded by tests/conftest.py)
loaded once per session as engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import Settings, load_settings
from worker.engine.engine import GuardEngine


def engine_settings(model_dir: Path, **overrides: object) -> Settings:
    """Settings pointing the model section at ``model_dir``."""
    return load_settings(model__path=str(model_dir), **overrides)


@pytest.fixture(scope="session")
def untrained_engine(untrained_model_dir: Path) -> GuardEngine:
    """A single-pass engine on the untrained tiny checkpoint (arbitrary but deterministic answers)."""
    return GuardEngine.from_settings(engine_settings(untrained_model_dir))


@pytest.fixture(scope="session")
def trained_engine(tiny_model_dir: Path) -> GuardEngine:
    """A single-pass engine on the trained tiny checkpoint (follows the toy policy)."""
    return GuardEngine.from_settings(engine_settings(tiny_model_dir))
