"""Helpers shared by several test packages (fixtures stay in tests/conftest.py)."""
