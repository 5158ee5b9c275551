"""Which errors from an object store are worth another try, and how long to keep trying.

Transient errors (HTTP 5xx, 408, 409, 429, S3's ``SlowDown`` and the like, dropped or timed-out
connections) are retried with exponential backoff and jitter for at most ``Retry.total``
seconds per request; anything else, and a transient error that outlasts that, is raised.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Retry", "is_transient"]

T = TypeVar("T")

# Error codes and statuses of S3 (and S3-compatible stores) worth another try.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "ConditionalRequestConflict",
        "OperationAborted",
    }
)
_TRANSIENT_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
# Exception classes (by name: their packages are optional) that mean a dropped connection.
_TRANSIENT_CLASSES = frozenset(
    {
        "HTTPClientError",  # botocore: EndpointConnectionError, ReadTimeoutError, ...
        "ClientConnectionError",  # aiohttp: ServerDisconnectedError, ClientOSError, ...
        "ClientPayloadError",
        "IncompleteRead",
        "ResponseParserError",
        "FSTimeoutError",
    }
)


def is_transient(e: BaseException) -> bool:
    """Whether an error from a store is worth retrying: a dropped or timed-out connection, an
    HTTP 5xx, 408, 409 or 429, or S3's ``SlowDown`` and the like.

    Example:
        >>> is_transient(ConnectionResetError()), is_transient(PermissionError())
        (True, False)
    """
    if isinstance(e, ConnectionError | TimeoutError | asyncio.TimeoutError):
        return True
    if _TRANSIENT_CLASSES & {c.__name__ for c in type(e).__mro__}:
        return True
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code", "")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    return False


@dataclass(frozen=True)
class Retry:
    """How long transient errors are retried: exponential backoff with jitter, from ``first``
    seconds up to ``cap``, for at most ``total`` seconds per request.

    Example:
        >>> r = Retry(total=10.0)
        >>> 0.0 < r.delay(1, time.monotonic() + 10) <= 0.1
        True
    """

    total: float = 60.0
    first: float = 0.1
    cap: float = 5.0

    def delay(self, attempt: int, deadline: float) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (never past ``deadline``)."""
        base = min(self.cap, self.first * 2.0 ** (attempt - 1))
        return max(0.0, min(base * random.uniform(0.5, 1.0), deadline - time.monotonic()))

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried while it raises transient errors."""
        deadline = time.monotonic() + self.total
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as e:
                attempt += 1
                if not is_transient(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(self.delay(attempt, deadline))
