"""The shared fixtures live in ``tests.support.fixtures`` (one copy for every test directory)."""

pytest_plugins = ["tests.support.fixtures"]
