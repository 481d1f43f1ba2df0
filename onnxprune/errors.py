"""One exception tree for everything onnxprune raises on purpose.

Front doors sort errors into two kinds and report each the same way everywhere:

- :data:`USER_ERRORS`: the user's model, data or options must change. CLI exit code 2; gRPC
  INVALID_ARGUMENT (bad input) or FAILED_PRECONDITION (nothing to prune, unsupported op).
- internal errors (:func:`is_internal`): :data:`INTERNAL_ERRORS` and any exception outside this tree. The
  input was acceptable and onnxprune failed it, e.g. a pruned model onnxruntime cannot load: that is a bug to
  report, not something the user can fix. CLI exit code 1 with "internal error: …; please report";
  gRPC INTERNAL.

The gRPC mapping is ``onnxprune.service.errors.to_status``; the CLI's is in ``onnxprune.cli``.
"""

from __future__ import annotations


class OnnxpruneError(Exception):
    """Root of every error onnxprune raises deliberately."""


class BadInputError(OnnxpruneError):
    """The user's model, data or options are not acceptable; the message says what to change."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnsupportedOpError(OnnxpruneError):
    """An op or pattern has no handler for the requested operation (e.g. no VJP rule)."""

    def __init__(self, message: str, *, op_type: str | None = None, node: str | None = None) -> None:
        super().__init__(message)
        self.op_type = op_type
        self.node = node


class PlanError(OnnxpruneError):
    """No pruning plan satisfies the request (nothing prunable, unreachable budget)."""


class SurgeryError(OnnxpruneError):
    """A graph edit could not be applied; the model was left untouched."""


class InvariantError(OnnxpruneError):
    """A result failed verification (checker, onnxruntime run, shape mismatch)."""


class CancelledError(OnnxpruneError):
    """The caller asked the running job to stop."""


USER_ERRORS: tuple[type[OnnxpruneError], ...] = (BadInputError, PlanError, UnsupportedOpError)
INTERNAL_ERRORS: tuple[type[OnnxpruneError], ...] = (SurgeryError, InvariantError)


def is_internal(exc: BaseException) -> bool:
    """Whether ``exc`` is onnxprune's own failure: an internal error class, or no onnxprune error at all."""
    return isinstance(exc, INTERNAL_ERRORS) or not isinstance(exc, OnnxpruneError)
