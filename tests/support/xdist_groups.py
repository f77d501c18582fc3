"""``xdist_group`` marks that work under pytest 9 (a plugin of tests/conftest.py).

Under ``--dist loadgroup`` the xdist controller sends every test whose node id ends in ``@<group>`` to one
worker. pytest-xdist 3.8 puts the group there by writing ``item._nodeid``, which pytest 9 no longer reads
(the id lives in ``item._id``): without this plugin every group silently spreads over all workers.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Append ``@<group>`` to the node id of each ``xdist_group`` test, as pytest-xdist means to."""
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import coerce_node_id  # pytest >= 9; before it, xdist's own rewrite works
    except ImportError:
        return
    for item in items:
        names = {
            str(m.args[0] if m.args else m.kwargs.get("name", "default"))
            for m in item.iter_markers("xdist_group")
        }
        if names and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(sorted(names))}")  # type: ignore[attr-defined]
