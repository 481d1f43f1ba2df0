"""``onnxprune serve``: run the gRPC compression service until SIGTERM."""

from __future__ import annotations

import argparse
import logging

from onnxprune.service.tasks import TaskFn, run_task


def run(args: argparse.Namespace, *, task: TaskFn = run_task) -> int:
    """Start the service on ``--host:--port`` with the store in ``--store``; returns after a graceful stop.

    ``task`` is the job function; only tests replace it.
    """
    from onnxprune.service.server import config_from_args, serve

    # One structured line per job event needs INFO from the service loggers even without -v.
    logging.getLogger("onnxprune.service").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args.host, args.port, args.store, config_from_args(args), task=task)
