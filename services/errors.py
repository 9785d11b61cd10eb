"""Service errors: one exception class per gRPC status.

Errors cross the Ray boundary as `services.wire.ErrorEvent` (code, message, retry hint), never as pickled
exception objects, so a worker can never make the gateway unpickle something surprising; `error_for`
turns one back into the exception of its code. The gateway's single `ErrorInterceptor` maps
`KvstashError.code` to the gRPC status. This module imports no grpc.
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


class AlreadyExists(KvstashError):
    code = "ALREADY_EXISTS"


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


_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, FailedPrecondition, AlreadyExists, ResourceExhausted,
                                      Unavailable, Unauthenticated, PermissionDenied, DeadlineExceeded, Internal)}


def error_for(code: str, message: str, retry_after_s: float | None = None) -> KvstashError:
    """The exception for a status code name (Internal for a name not listed)."""
    return _BY_CODE.get(code, Internal)(str(message), float(retry_after_s) if retry_after_s is not None else None)
