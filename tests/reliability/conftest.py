"""Reliability tests print their figures (events, crashes, outages, lost, duplicates) at the end of the run."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.summary import section_lines

# ``report`` appends to "lines"; tests.support.summary prints them (collected from every xdist worker).
_FIGURES: dict[str, Any] = {"lines": section_lines("reliability figures")}


@pytest.fixture(scope="session")
def reliability_figures() -> dict[str, Any]:
    return _FIGURES
