"""Errors a request can end with, named by their gRPC status code, with the HTTP status beside it.

Every error names the request field it is about (``texts[2]``, ``k``, ``index``...) so a client
can tell what to fix; the message starts with that field.
"""

from __future__ import annotations

#: gRPC status code name -> HTTP status.
HTTP_STATUS = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


class ServeError(Exception):
    """A request that cannot be answered: ``code`` (gRPC name), ``field`` (may be empty), message."""

    code = "INTERNAL"

    def __init__(self, message: str, field: str = "") -> None:
        self.field = field
        self.message = f"{field}: {message}" if field else message
        super().__init__(self.message)

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "field": self.field, "message": self.message}


class InvalidArgument(ServeError):
    code = "INVALID_ARGUMENT"


class NotFound(ServeError):
    code = "NOT_FOUND"


class QueueFull(ServeError):
    """The batcher's queue holds ``max_queue`` inputs already: refused at once, retry later."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServeError):
    """Not ready yet (loading) or draining (SIGTERM received)."""

    code = "UNAVAILABLE"


class Cancelled(ServeError):
    """The client went away before its request was read (nobody is left to answer)."""

    code = "CANCELLED"


class DeadlineExceeded(ServeError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(ServeError):
    code = "UNAUTHENTICATED"
