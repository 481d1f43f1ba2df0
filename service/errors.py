"""Service-level errors and the one mapping from exceptions to gRPC statuses.

Pipeline errors (``onnxprune.errors``) and the few conditions only a service has (unknown job, quota, not
ready, shutting down, bad token, a crashed job) all become a ``google.rpc.Status`` in :func:`to_status`.
INVALID_ARGUMENT carries ``google.rpc.BadRequest`` details naming the field, so clients can point at the
offending option; PERMISSION_DENIED (a policy refusal) carries a ``google.rpc.ErrorInfo`` with the reason and what
would allow it. INTERNAL (onnxprune's own failures: the input was fine) says "please report" and carries a
``google.rpc.ErrorInfo`` whose ``reason`` is the error type, so a client can tell a failed verification from a
crashed job without parsing the message.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from onnxprune.errors import (
    BadInputError,
    CancelledError,
    InvariantError,
    OnnxpruneError,
    PlanError,
    SurgeryError,
    UnsupportedOpError,
)
from onnxprune.service.logs import log_event

log = logging.getLogger(__name__)


class ServiceError(OnnxpruneError):
    """A condition of the service rather than of the model or options."""


class NotFoundError(ServiceError):
    """No such job, blob or result for this tenant (other tenants' jobs are reported the same way)."""


class ResourceExhaustedError(ServiceError):
    """The blob store is over its quota or the job queue is full; retry later or free space."""


class NotReadyError(ServiceError):
    """The request needs the job in another state (e.g. downloading results of a running job)."""


class UnavailableError(ServiceError):
    """The server is shutting down and accepts no new work."""


class UnauthenticatedError(ServiceError):
    """Missing or wrong bearer token."""


class PermissionDeniedError(ServiceError):
    """The request is understood but this server's policy forbids it (e.g. a ``python:`` metric would run
    client-chosen code on the server). ``reason`` and ``metadata`` travel as a ``google.rpc.ErrorInfo``."""

    def __init__(self, message: str, *, reason: str, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.metadata = dict(metadata or {})


class JobCrashedError(ServiceError):
    """A job failed outside onnxprune's error tree: a bug in the job, or its process died (out of memory?).

    ``error_type`` is what the job recorded (an exception type name, or ``WorkerDied``).
    """

    def __init__(self, message: str, *, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


# Most specific first: the first isinstance match wins.
_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (BadInputError, code_pb2.INVALID_ARGUMENT),
    (NotFoundError, code_pb2.NOT_FOUND),
    (ResourceExhaustedError, code_pb2.RESOURCE_EXHAUSTED),
    (NotReadyError, code_pb2.FAILED_PRECONDITION),
    (UnavailableError, code_pb2.UNAVAILABLE),
    (UnauthenticatedError, code_pb2.UNAUTHENTICATED),
    (PermissionDeniedError, code_pb2.PERMISSION_DENIED),
    (UnsupportedOpError, code_pb2.FAILED_PRECONDITION),
    (PlanError, code_pb2.FAILED_PRECONDITION),
    (CancelledError, code_pb2.CANCELLED),
    (SurgeryError, code_pb2.INTERNAL),
    (InvariantError, code_pb2.INTERNAL),
    (JobCrashedError, code_pb2.INTERNAL),
)
DOMAIN = "onnxprune"


def to_status(exc: BaseException) -> status_pb2.Status:
    """Map an exception to the ``google.rpc.Status`` a client receives.

    Deliberate errors keep their message. Anything else is a bug in the server, logged with its traceback and
    reported as INTERNAL without internals (only the type name). BadInputError adds a BadRequest field
    violation (field and reason); INTERNAL adds an ErrorInfo naming the error type.
    """
    code = next((code for cls, code in _CODES if isinstance(exc, cls)), None)
    if code is None:
        log.error("event=rpc.internal_error error=%r", exc, exc_info=exc)
        return _internal(f"internal error: {type(exc).__name__}; please report it", type(exc).__name__, "")
    if code == code_pb2.INTERNAL:
        log_event(log, "rpc.internal_error", logging.ERROR, error_type=type(exc).__name__, error=str(exc)[:500])
        reason = exc.error_type if isinstance(exc, JobCrashedError) else type(exc).__name__
        return _internal(f"internal error: {exc}; please report it", reason, str(exc))
    status = status_pb2.Status(code=code, message=str(exc))
    if isinstance(exc, PermissionDeniedError):
        info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata)
        status.details.append(_packed(info))
    if isinstance(exc, BadInputError):
        violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field or "", description=str(exc))
        status.details.append(_packed(error_details_pb2.BadRequest(field_violations=[violation])))
    return status


def _internal(message: str, reason: str, error: str) -> status_pb2.Status:
    """INTERNAL with an ErrorInfo: ``reason`` the error type, ``metadata["error"]`` the bare message."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata={"error": error} if error else {})
    return status_pb2.Status(code=code_pb2.INTERNAL, message=message, details=[_packed(info)])


def _packed(message: Any) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """End the RPC with the status for ``exc`` (raises, as ``context.abort`` does)."""
    context.abort_with_status(rpc_status.to_status(to_status(exc)))
