"""Progress reporting and cancellation passed into long-running stages.

Jobs never reach into a server's state: the caller hands in a callback and an Event, so the same job runs in a local worker or on another machine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from onnxprune.errors import CancelledError


@dataclass(frozen=True)
class Progress:
    """One progress event: ``fraction`` is within the current stage, in [0, 1]."""

    stage: str
    fraction: float
    message: str = ""


ProgressFn = Callable[[Progress], None]


@dataclass
class Reporter:
    """Bundles the optional callback and cancel Event so stages take one argument."""

    callback: ProgressFn | None = None
    cancel: threading.Event | None = None

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        self.check_cancel()
        if self.callback is not None:
            self.callback(Progress(stage, max(0.0, min(1.0, fraction)), message))

    def check_cancel(self) -> None:
        """Raise CancelledError when the caller asked to stop; call at stage and batch boundaries."""
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError("job cancelled")
