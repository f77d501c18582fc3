"""The old Serve import path named in users' Serve config files keeps working, with a warning."""

import importlib
import sys

import pytest


def test_old_serve_import_path_warns_and_forwards_to_the_new_one() -> None:
    sys.modules.pop("worker.runtime.serve_app", None)
    with pytest.warns(DeprecationWarning, match="worker.serve.app:build_app"):
        old = importlib.import_module("worker.runtime.serve_app")
    from worker.serve.app import build_app

    assert old.build_app is build_app
