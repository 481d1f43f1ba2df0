"""Service-level errors and the one mapping from exceptions to gRPC statuses.

Pipeline errors (``onnxprune.errors``) and the few conditions only a service has (unknown job, quota, not
ready, shutting down, bad token) all become a ``google.rpc.Status`` in :func:`to_status`; INVALID_ARGUMENT
carries ``google.rpc.BadRequest`` details naming the field, so clients can point at the offending option.
"""

from __future__ import annotations

import logging

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


# Most specific first: the first isinstance match wins.
_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (BadInputError, code_pb2.INVALID_ARGUMENT),
    (NotFoundError, code_pb2.NOT_FOUND),
    (ResourceExhaustedError, code_pb2.RESOURCE_EXHAUSTED),
    (NotReadyError, code_pb2.FAILED_PRECONDITION),
    (UnavailableError, code_pb2.UNAVAILABLE),
    (UnauthenticatedError, code_pb2.UNAUTHENTICATED),
    (UnsupportedOpError, code_pb2.FAILED_PRECONDITION),
    (PlanError, code_pb2.FAILED_PRECONDITION),
    (CancelledError, code_pb2.CANCELLED),
    (SurgeryError, code_pb2.INTERNAL),
    (InvariantError, code_pb2.INTERNAL),
)


def to_status(exc: BaseException) -> status_pb2.Status:
    """Map an exception to the ``google.rpc.Status`` a client receives.

    Deliberate errors keep their message; anything else is a bug, logged with its traceback and reported as
    INTERNAL without internals. BadInputError adds a BadRequest field violation (field and reason).
    """
    code = next((code for cls, code in _CODES if isinstance(exc, cls)), None)
    if code is None:
        log.error("event=rpc.internal_error error=%r", exc, exc_info=exc)
        return status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error: {type(exc).__name__}")
    status = status_pb2.Status(code=code, message=str(exc))
    if isinstance(exc, BadInputError):
        detail = any_pb2.Any()
        violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field or "", description=str(exc))
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        status.details.append(detail)
    return status


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """End the RPC with the status for ``exc`` (raises, as ``context.abort`` does)."""
    context.abort_with_status(rpc_status.to_status(to_status(exc)))
