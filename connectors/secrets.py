"""The registry of secret values (tokens, passwords) and the one function that masks them.

Config loading registers every value read from `${VAR}` or a secrets file; the log processor,
error formatting and anything that prints user-facing text pass it through `redact`.
"""

from __future__ import annotations

import threading
from typing import Any

MASK = "***"
_MIN_SECRET_LEN = 4  # masking "a" everywhere would destroy every message

_lock = threading.Lock()
_secrets: set[str] = set()
# Longest first, so a secret that contains another is masked whole. Rebuilt on register:
# `redact` runs on every field of every log line.
_by_length: tuple[str, ...] = ()


def register_secret(value: str | None) -> None:
    global _by_length
    if value and len(value) >= _MIN_SECRET_LEN:
        with _lock:
            _secrets.add(value)
            _by_length = tuple(sorted(_secrets, key=len, reverse=True))


def registered_secrets() -> frozenset[str]:
    with _lock:
        return frozenset(_secrets)


def redact(text: str) -> str:
    if not text:
        return text
    for secret in _by_length:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_value(value: Any) -> Any:
    """Redact strings inside nested dicts/lists/tuples (log event dicts, error payloads)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return value
