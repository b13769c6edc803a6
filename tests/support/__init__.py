"""Helpers shared by several test modules (importable as ``support.*``: tests/ is on the path)."""
