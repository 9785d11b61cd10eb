"""Service errors: one exception class per gRPC status, and their wire form between Ray actors.

Errors cross the Ray boundary as plain dicts (`to_wire` / `from_wire`), never as pickled exception
objects, so a worker can never make the gateway unpickle something surprising. The gateway's single
`ErrorInterceptor` maps `KvstashError.code` to the gRPC status. This module imports no grpc.
"""

from __future__ import annotations


class KvstashError(Exception):
    """Base of every error a client may see; `code` names a grpc.StatusCode member."""

    code = "INTERNAL"

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s  # sent as trailing metadata `retry-after-ms` when set


class InvalidArgument(KvstashError):
    code = "INVALID_ARGUMENT"


class NotFound(KvstashError):
    code = "NOT_FOUND"


class FailedPrecondition(KvstashError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(KvstashError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(KvstashError):
    code = "UNAVAILABLE"


class Unauthenticated(KvstashError):
    code = "UNAUTHENTICATED"


class PermissionDenied(KvstashError):
    code = "PERMISSION_DENIED"


class DeadlineExceeded(KvstashError):
    code = "DEADLINE_EXCEEDED"


class Internal(KvstashError):
    code = "INTERNAL"


_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted,
                                      Unavailable, Unauthenticated, PermissionDenied, DeadlineExceeded, Internal)}


def to_wire(exc: KvstashError) -> dict:
    d = {"code": exc.code, "message": exc.message}
    if exc.retry_after_s is not None:
        d["retry_after_s"] = float(exc.retry_after_s)
    return d


def from_wire(d: dict) -> KvstashError:
    retry = d.get("retry_after_s")
    return _BY_CODE.get(d.get("code"), Internal)(str(d.get("message", "")),
                                                 float(retry) if isinstance(retry, (int, float)) else None)
