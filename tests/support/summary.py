"""Terminal-summary sections that survive ``pytest -n`` (pytest-xdist).

Tests append lines to ``section_lines(title)``; the run prints each non-empty section at its end. Under
xdist the tests run in worker processes, whose own terminal summary nobody sees: each worker hands its
lines to the controller (``workeroutput``) when it finishes, and the controller prints them all.
"""

from __future__ import annotations

from typing import Any

import pytest

_SECTIONS: dict[str, list[str]] = {}
_KEY = "mw_summary_sections"


def section_lines(title: str) -> list[str]:
    """The list of lines printed under ``title`` at the end of the run (the same list for every caller)."""
    return _SECTIONS.setdefault(title, [])


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller prints the lines
        workeroutput[_KEY] = {title: list(lines) for title, lines in _SECTIONS.items() if lines}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: collect a finished worker's lines."""
    for title, lines in getattr(node, "workeroutput", {}).get(_KEY, {}).items():
        section_lines(title).extend(lines)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for title, lines in _SECTIONS.items():
        if lines:
            terminalreporter.section(title)
            for line in lines:
                terminalreporter.write_line(line)
