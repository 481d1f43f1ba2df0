"""``onnxprune prune/analyze --server``: the same commands, run as jobs on a compression service.

Output matches the embedded run (same files, same report, same summary: both print through
``onnxprune.commands._output``). Exit codes: 0 success; 2 when the service refused a request the user must
change (bad option, bad model, unknown job, bad token: the status codes in ``USER_ERROR_CODES``); 1 when the
service failed. A job that failed raises the job's own error, which ``onnxprune.cli`` maps as it maps the
embedded run's errors (2 for the user's input, 1 for internal errors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from onnxprune.client import USER_ERROR_CODES, Client, ServiceError
from onnxprune.commands._output import render_analysis, write_report
from onnxprune.commands._progress import StageBar
from onnxprune.spec import PruneSpec, parse_shape_args


def connect(args: argparse.Namespace) -> Client:
    """A client for ``--server/--token/--tls-ca``.

    The token can also come from ``$ONNXPRUNE_TOKEN`` (keeps it out of the process list), and a client
    certificate for mutual TLS from ``--tls-cert/--tls-key`` when the parser has them, else from
    ``$ONNXPRUNE_TLS_CERT`` / ``$ONNXPRUNE_TLS_KEY``.
    """
    env = os.environ.get
    return Client(
        args.server,
        token=args.token or env("ONNXPRUNE_TOKEN"),
        tls_ca=args.tls_ca,
        tls_cert=getattr(args, "tls_cert", None) or env("ONNXPRUNE_TLS_CERT"),
        tls_key=getattr(args, "tls_key", None) or env("ONNXPRUNE_TLS_KEY"),
    )


def guarded(action: Callable[[], int]) -> int:
    """Run ``action``; a request the service refused prints one line and returns 2 (user's) or 1 (service's).

    Every other error goes up to ``onnxprune.cli``, which reports it like the embedded run's.
    """
    try:
        return action()
    except ServiceError as e:
        print(f"onnxprune: error: {e}", file=sys.stderr)
        return 2 if e.code in USER_ERROR_CODES else 1


def prune(args: argparse.Namespace, spec: PruneSpec) -> int:
    """Upload ``args.model``, run the job with a progress bar, download the results, print the summary."""
    from onnxprune.report import render_table

    def action() -> int:
        with connect(args) as client:
            job = client.submit(args.model, spec, output_name=Path(args.output).name)
            try:
                with StageBar("prune") as bar:
                    job = client.wait(job.job_id, progress=bar)
            except KeyboardInterrupt:
                client.cancel(job.job_id)
                print(f"onnxprune: cancelled job {job.job_id}", file=sys.stderr)
                raise
            client.fetch(job.job_id, args.output, job=job)
            report = client.report(job.job_id)
        write_report(report, args.report)
        print(render_table(report))
        print(f"wrote {args.output}" + (f" and {args.report}" if args.report else ""))
        return 0

    return guarded(action)


def analyze(args: argparse.Namespace) -> int:
    """``onnxprune analyze --server``: the analysis runs on the service, the output is the embedded one."""

    def action() -> int:
        with connect(args) as client:
            result = client.analyze(args.model, parse_shape_args(args.shape))
        print(json.dumps(result, indent=2) if args.json else render_analysis(result))
        return 0

    return guarded(action)
