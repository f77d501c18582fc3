"""Deprecated package: its modules moved to ``worker.serve`` (HTTP) and ``worker.runners`` (Ray actors, the fleet).

Only ``worker.runtime.serve_app:build_app`` is kept, because Serve config files name it as their
``import_path``; it warns and forwards to ``worker.serve.app:build_app``.
"""
