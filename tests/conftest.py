"""Shared test configuration: the stack fixtures are a plugin module."""

pytest_plugins = ["tests.fix_stack"]
