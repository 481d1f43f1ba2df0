"""The gRPC servicer: translates messages to :class:`onnxprune.service.jobs.JobManager` calls and back, nothing more.

Every method runs inside :func:`_translated`, which turns any exception into a status through
:func:`onnxprune.service.errors.to_status` (the one mapping), so a bad request never escapes as an unhandled error.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from onnxprune._proto import compressor_pb2 as pb
from onnxprune._proto import compressor_pb2_grpc as pb_grpc
from onnxprune._proto.convert import spec_from_proto, spec_to_proto
from onnxprune.errors import BadInputError, OnnxpruneError
from onnxprune.spec import PruneSpec
from onnxprune.service.auth import Authenticator
from onnxprune.service.errors import abort
from onnxprune.service.jobs import JobManager
from onnxprune.service.logs import log_event
from onnxprune.service.store import JobRecord

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)

_STATES = {
    "QUEUED": pb.JOB_STATE_QUEUED,
    "RUNNING": pb.JOB_STATE_RUNNING,
    "SUCCEEDED": pb.JOB_STATE_SUCCEEDED,
    "FAILED": pb.JOB_STATE_FAILED,
    "CANCELLED": pb.JOB_STATE_CANCELLED,
    "EXPIRED": pb.JOB_STATE_EXPIRED,
}


def _fail(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    if context.code() is not None:  # type: ignore[attr-defined]  # context.abort already ran; let its exception through
        raise exc
    if isinstance(exc, OnnxpruneError):
        log_event(log, "rpc.refused", method=method, error_type=type(exc).__name__, error=str(exc)[:300])
    abort(context, exc)


def _translated(method: F) -> F:
    """Map exceptions of a unary-response method to statuses."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as e:  # noqa: BLE001 - every error becomes a status; to_status logs real bugs
            _fail(context, e, method.__name__)

    return wrapper  # type: ignore[return-value]


def _translated_stream(method: F) -> F:
    """Map exceptions of a streaming-response method to statuses."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except Exception as e:  # noqa: BLE001
            _fail(context, e, method.__name__)

    return wrapper  # type: ignore[return-value]


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def job_to_proto(record: JobRecord, retention_s: float) -> pb.Job:
    job = pb.Job(
        job_id=record.job_id,
        state=_STATES.get(record.state, pb.JOB_STATE_UNSPECIFIED),
        stage=record.stage,
        fraction=record.fraction,
        message=record.message,
        error=record.error,
        error_type=record.error_type,
        spec=spec_to_proto(PruneSpec.from_dict(record.spec)),
        results=[pb.FileMetadata(name=r.name, size=r.size, sha256=r.sha256) for r in record.results],
        output_name=record.output_name,
    )
    for name, seconds in (("create_time", record.created), ("start_time", record.started),
                          ("end_time", record.finished)):
        ts = _timestamp(seconds)
        if ts is not None:
            getattr(job, name).CopyFrom(ts)
    if record.finished is not None:
        job.expire_time.CopyFrom(_timestamp(record.finished + retention_s))
    return job


def _model_files(model: pb.ModelInput) -> tuple[str, dict[str, str]]:
    files: dict[str, str] = {}
    for f in model.files:
        if f.path in files:
            raise BadInputError(f"model.files lists {f.path!r} twice", field="model.files")
        files[f.path] = f.blob_id
    return model.model_path, files


def _shapes(shapes: Any) -> dict[str, list[int]]:
    return {name: list(shape.dims) for name, shape in shapes.items()}


class CompressorServicer(pb_grpc.CompressorServicer):
    def __init__(self, jobs: JobManager, auth: Authenticator, retention_s: float) -> None:
        self._jobs = jobs
        self._auth = auth
        self._retention_s = retention_s

    def _job(self, record: JobRecord) -> pb.Job:
        return job_to_proto(record, self._retention_s)

    @_translated
    def UploadBlob(self, request_iterator: Iterator[pb.UploadBlobRequest], context: grpc.ServicerContext) -> Any:
        tenant = self._auth.tenant_of(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "metadata":
            raise BadInputError("the first upload message must carry metadata (name, size, sha256)", field="metadata")

        def chunks() -> Iterator[bytes]:
            for message in request_iterator:
                if message.WhichOneof("payload") != "chunk":
                    raise BadInputError("metadata may only lead the upload stream", field="metadata")
                yield message.chunk

        md = first.metadata
        info = self._jobs.upload(tenant, md.name, md.size, md.sha256, chunks())
        return pb.UploadBlobResponse(blob_id=info.blob_id, size=info.size)

    @_translated
    def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.ServicerContext) -> Any:
        tenant = self._auth.tenant_of(context)
        model_path, files = _model_files(request.model)
        record = self._jobs.submit(
            tenant,
            model_path=model_path,
            files=files,
            spec=spec_from_proto(request.spec),
            inputs={f.path: f.blob_id for f in request.inputs},
            output_name=request.output_name,
        )
        return pb.SubmitJobResponse(job=self._job(record))

    @_translated_stream
    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        tenant = self._auth.tenant_of(context)
        for record, line in self._jobs.watch(tenant, request.job_id, context.is_active):
            yield pb.WatchJobResponse(job=self._job(record), log_line=line)

    @_translated
    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> Any:
        return pb.GetJobResponse(job=self._job(self._jobs.get(self._auth.tenant_of(context), request.job_id)))

    @_translated
    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> Any:
        records = self._jobs.list_jobs(self._auth.tenant_of(context), request.limit or 100)
        return pb.ListJobsResponse(jobs=[self._job(r) for r in records])

    @_translated
    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> Any:
        return pb.CancelJobResponse(job=self._job(self._jobs.cancel(self._auth.tenant_of(context), request.job_id)))

    @_translated_stream
    def DownloadResult(self, request: pb.DownloadResultRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        tenant = self._auth.tenant_of(context)
        result, chunks = self._jobs.open_result(tenant, request.job_id, request.name)
        yield pb.DownloadResultResponse(metadata=pb.FileMetadata(name=result.name, size=result.size,
                                                                 sha256=result.sha256))
        for chunk in chunks:
            yield pb.DownloadResultResponse(chunk=chunk)

    @_translated
    def Analyze(self, request: pb.AnalyzeRequest, context: grpc.ServicerContext) -> Any:
        tenant = self._auth.tenant_of(context)
        model_path, files = _model_files(request.model)
        report = self._jobs.analyze(tenant, model_path=model_path, files=files, shapes=_shapes(request.shapes),
                                    active=context.is_active)
        return pb.AnalyzeResponse(report_json=json.dumps(report))
