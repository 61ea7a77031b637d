"""Fixtures shared by the integration modules: the daemon and its environment."""

from tests.integration.test_e2e_stream import daemon, migration_env  # noqa: F401
