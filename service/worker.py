"""The job process: ``python -m onnxprune.service.worker FD`` runs one task and reports over file descriptor FD.

The server starts a fresh interpreter per job (not ``multiprocessing``'s spawn, which re-runs the parent's
``__main__`` and breaks when the server is embedded in another program). Protocol:

- stdin, parent → child: an 8-byte big-endian length and a pickle of (task function, request, in_dir,
  out_dir); afterwards one byte ``c`` asks the job to stop. EOF (the server died) also stops it, so a killed
  server leaves no orphan jobs running.
- FD, child → parent: ``multiprocessing.connection`` messages ``("progress", stage, fraction, message)``,
  ``("log", line)``, ``("peak", max_rss_kb)``, then ``("done", files, report)`` or
  ``("error", type name, message, field)``.
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import struct
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, BinaryIO

from onnxprune.errors import OnnxpruneError, is_internal

HEADER = struct.Struct(">Q")
CANCEL = b"c"


class _LogForwarder(logging.Handler):
    """Forwards the job's log records to the server as log lines."""

    def __init__(self, send: Any) -> None:
        super().__init__(logging.INFO)
        self._send = send
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(("log", self.format(record)))
        except Exception:  # noqa: BLE001 - a closed pipe must not break the job
            self.handleError(record)


def _watch_stdin(stream: BinaryIO, cancel: threading.Event) -> None:
    while True:
        byte = stream.read(1)
        if not byte or byte == CANCEL:
            cancel.set()
            return


def encode_job(payload: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(payload)
    return HEADER.pack(len(data)) + data


def main(argv: list[str]) -> int:
    conn = Connection(int(argv[0]), readable=False)
    lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with lock:
            conn.send(message)

    stdin = sys.stdin.buffer
    (size,) = HEADER.unpack(stdin.read(HEADER.size))
    task, request, in_dir, out_dir = pickle.loads(stdin.read(size))
    cancel = threading.Event()
    threading.Thread(target=_watch_stdin, args=(stdin, cancel), daemon=True).start()
    root = logging.getLogger()
    root.addHandler(_LogForwarder(send))
    root.setLevel(logging.INFO)
    try:
        result = task(request, Path(in_dir), Path(out_dir),
                      lambda p: send(("progress", p.stage, p.fraction, p.message)), cancel)
        message: tuple[Any, ...] = ("done", result.files, result.report)
    except OnnxpruneError as e:
        if is_internal(e):  # onnxprune's own failure: the server's log gets the traceback for the report
            traceback.print_exc()
        message = ("error", type(e).__name__, str(e), getattr(e, "field", None))
    except BaseException as e:  # noqa: BLE001 - report any bug to the server instead of dying silently
        traceback.print_exc()
        message = ("error", type(e).__name__, f"internal error in job: {type(e).__name__}: {e}", None)
    send(("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    send(message)
    conn.close()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: the stdin watcher thread is blocked in read() and would abort finalisation.
    os._exit(code)
