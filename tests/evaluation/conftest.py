from tests.stream.conftest import engine_settings_overrides, guard_engine  # noqa: F401  (shared fixtures)
