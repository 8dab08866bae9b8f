"""State-store errors that the CLI turns into a clear message and an exit code."""

from __future__ import annotations


class StateSchemaError(Exception):
    """The database's schema is not the one this version of Handoff expects (exit 2)."""
