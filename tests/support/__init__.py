"""Shared test support: in-memory stand-ins (engine, cache) for fast logic tests beside the integration tests."""
