"""Reliability tests print their figures (events, crashes, outages, lost, duplicates) at the end of the run."""

from __future__ import annotations

from typing import Any

import pytest

_FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="session")
def reliability_figures() -> dict[str, Any]:
    return _FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = _FIGURES.get("lines", [])
    if lines:
        terminalreporter.section("reliability figures")
        for line in lines:
            terminalreporter.write_line(line)
