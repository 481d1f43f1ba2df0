"""One exception tree for everything onnxprune raises on purpose.

Front doors map these to exit codes (CLI: 2 for :class:`BadInputError`) and gRPC status codes
(``service.errors``); anything else escaping a stage is a bug and keeps its traceback.
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
