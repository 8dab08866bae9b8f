"""One table decides what an API failure means: retry, park the record, or stop the run.

The kind decides the exit code (`sync` exits 3 for AUTH/UNREACHABLE, 1 when records were
parked); the message is written for people and never carries a secret.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.StrEnum):
    TRANSIENT = "transient"  # 429, 5xx, timeouts, dropped connections: retry with backoff
    RECORD = "record"  # 400/404/409/422: this record is refused; park it, go on
    AUTH = "auth"  # 401/403: credentials are wrong or lack scope; stop, exit 3
    UNREACHABLE = "unreachable"  # transient failures outlasted the retry budget on a read


class ConnectorError(Exception):
    """An API failure, classified, with a message safe to show and log."""

    def __init__(
        self,
        system: str,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.system = system
        self.kind = kind
        self.status = status
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        status = f" (HTTP {self.status})" if self.status else ""
        return f"{self.system}{status}: {self.message}"


# What each status means, after the Airbyte CDK's DEFAULT_ERROR_MAPPING: one place to read.
STATUS_KINDS: dict[int, ErrorKind] = {
    400: ErrorKind.RECORD,
    401: ErrorKind.AUTH,
    402: ErrorKind.RECORD,
    403: ErrorKind.AUTH,
    404: ErrorKind.RECORD,
    405: ErrorKind.RECORD,
    408: ErrorKind.TRANSIENT,
    409: ErrorKind.RECORD,
    412: ErrorKind.RECORD,
    422: ErrorKind.RECORD,
    423: ErrorKind.TRANSIENT,
    429: ErrorKind.TRANSIENT,
}

AUTH_HINT = "check the connection's credentials and scopes (handoff check)"


def kind_for_status(status: int) -> ErrorKind:
    if status >= 500:
        return ErrorKind.TRANSIENT
    return STATUS_KINDS.get(status, ErrorKind.RECORD)
