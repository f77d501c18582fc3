"""Deprecated Serve import path: use ``worker.serve.app:build_app`` in Serve config files."""

import warnings

from worker.serve.app import build_app

warnings.warn(
    "worker.runtime.serve_app is deprecated: use the import path worker.serve.app:build_app",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["build_app"]
