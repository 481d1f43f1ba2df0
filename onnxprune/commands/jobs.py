"""``onnxprune jobs list|show|cancel|fetch``: manage jobs on a compression service."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from onnxprune.client import JobInfo
from onnxprune.commands.remote import connect, guarded
from onnxprune.errors import BadInputError


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) if seconds else "-"


def _line(job: JobInfo) -> str:
    progress = f"{job.stage} {job.fraction:.0%}" if job.state == "RUNNING" else (job.error or "")[:60]
    return f"{job.job_id}  {job.state:<9}  {_when(job.created)}  {progress}"


def _show(job: JobInfo) -> str:
    data = asdict(job)
    data["spec"] = job.spec.to_dict() if job.spec else None
    return json.dumps(data, indent=2)


def run(args: argparse.Namespace) -> int:
    def action() -> int:
        if args.action != "list" and not args.job_id:
            raise BadInputError(f"'jobs {args.action}' needs a JOB_ID", field="job_id")
        with connect(args) as client:
            if args.action == "list":
                print(f"{'job':<32}  {'state':<9}  {'created (UTC)':<19}  progress / error")
                for job in client.list():
                    print(_line(job))
            elif args.action == "show":
                print(_show(client.get(args.job_id)))
            elif args.action == "cancel":
                job = client.cancel(args.job_id)
                print(f"{job.job_id}: {job.state}")
            else:
                job = client.get(args.job_id)
                if job.state != "SUCCEEDED":
                    raise BadInputError(f"job {job.job_id} is {job.state}; only SUCCEEDED jobs have results",
                                        field="job_id")
                output = Path(args.output or job.output_name)
                report = output.with_name(output.stem + ".report.json")
                for path in client.fetch(job.job_id, output, report=report, job=job):
                    print(f"wrote {path}")
        return 0

    return guarded(action)
