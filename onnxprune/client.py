"""A small Python client for the onnxprune compression service.

``Client.prune`` and ``Client.analyze`` mirror :func:`onnxprune.pipeline.prune` / ``analyze``: same arguments,
same results, same exceptions, but the work runs on a server. Everything grpc stays in this module (and
``onnxprune.service``); callers get plain dataclasses and onnxprune exceptions.

Example:
    >>> with Client("127.0.0.1:50051", token="s3cret") as client:       # doctest: +SKIP
    ...     result = client.prune("model.onnx", "pruned.onnx", PruneSpec(ratio=0.3))
    ...     result.report["pruned"]["params"]
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from onnxprune import errors as onnxprune_errors
from onnxprune._proto import compressor_pb2 as pb
from onnxprune._proto import compressor_pb2_grpc as pb_grpc
from onnxprune._proto.convert import spec_from_proto, spec_to_proto
from onnxprune.errors import INTERNAL_ERRORS, BadInputError, CancelledError, OnnxpruneError
from onnxprune.io.safety import external_files
from onnxprune.io.scan import file_sha256
from onnxprune.progress import Progress, ProgressFn
from onnxprune.spec import DATA_OPTIONS, PruneSpec

if TYPE_CHECKING:
    from onnxprune.pipeline import PruneResult

CHUNK_SIZE = 1 << 20
REPORT_NAME = "report.json"
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")
# Status codes that mean "the request is wrong", as opposed to "the service or the job failed".
USER_ERROR_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED",
                              "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "ALREADY_EXISTS"})


class ServiceError(OnnxpruneError):
    """The service refused or could not serve a request; ``code`` is the gRPC status name."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class JobFailedError(OnnxpruneError):
    """A remote job failed for a reason with no onnxprune exception type (e.g. its worker died)."""

    def __init__(self, message: str, *, job: JobInfo) -> None:
        super().__init__(message)
        self.job = job


@dataclass(frozen=True)
class FileInfo:
    name: str
    size: int
    sha256: str


@dataclass
class JobInfo:
    """A job as the service reports it; ``state`` is one of QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED."""

    job_id: str
    state: str
    stage: str = ""
    fraction: float = 0.0
    message: str = ""
    error: str = ""
    error_type: str = ""
    results: list[FileInfo] = field(default_factory=list)
    output_name: str = ""
    spec: PruneSpec | None = None
    created: float | None = None
    finished: float | None = None
    expires: float | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class JobEvent:
    job: JobInfo
    log_line: str = ""


def _seconds(msg: Any, name: str) -> float | None:
    return getattr(msg, name).ToNanoseconds() / 1e9 if msg.HasField(name) else None


def job_from_proto(job: pb.Job) -> JobInfo:
    return JobInfo(
        job_id=job.job_id,
        state=pb.JobState.Name(job.state).removeprefix("JOB_STATE_"),
        stage=job.stage,
        fraction=job.fraction,
        message=job.message,
        error=job.error,
        error_type=job.error_type,
        results=[FileInfo(r.name, r.size, r.sha256) for r in job.results],
        output_name=job.output_name,
        spec=spec_from_proto(job.spec),
        created=_seconds(job, "create_time"),
        finished=_seconds(job, "end_time"),
        expires=_seconds(job, "expire_time"),
    )


def error_from_rpc(e: grpc.RpcError) -> OnnxpruneError:
    """The one mapping from a failed call to an onnxprune exception (the reverse of ``onnxprune.service.errors``)."""
    code = e.code().name if isinstance(e, grpc.Call) and e.code() else "UNKNOWN"
    message = (e.details() if isinstance(e, grpc.Call) else "") or str(e)
    if code == "INVALID_ARGUMENT":
        field_name = None
        status = rpc_status.from_call(e) if isinstance(e, grpc.Call) else None
        details: list[Any] = list(status.details) if status else []
        for detail in details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    field_name = bad.field_violations[0].field or None
        return BadInputError(message, field=field_name)
    if code == "CANCELLED":
        return CancelledError(message)
    if code == "INTERNAL":
        rebuilt = _internal_error(e)
        if rebuilt is not None:
            return rebuilt
    return ServiceError(f"{code}: {message}", code=code)


def _internal_error(e: grpc.RpcError) -> OnnxpruneError | None:
    """The library's internal error (SurgeryError, InvariantError) an INTERNAL status names in its ErrorInfo,
    so a remote call raises what the embedded call raises; None for other internal failures."""
    status = rpc_status.from_call(e) if isinstance(e, grpc.Call) else None
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and detail.Unpack(info):
            cls = next((c for c in INTERNAL_ERRORS if c.__name__ == info.reason), None)
            if cls is not None and info.domain == "onnxprune":
                return cls(info.metadata.get("error", "") or e.details())
    return None


def job_error(job: JobInfo) -> OnnxpruneError:
    """The exception a failed job raised on the server, rebuilt by its type name."""
    if job.state == "CANCELLED":
        return CancelledError(f"job {job.job_id} was cancelled")
    cls = getattr(onnxprune_errors, job.error_type, None)
    if isinstance(cls, type) and issubclass(cls, OnnxpruneError) and cls is not OnnxpruneError:
        return cls(job.error)
    return JobFailedError(f"job {job.job_id} {job.state.lower()}: {job.error or 'no reason recorded'}", job=job)


class Client:
    """Talks to one onnxprune service.

    Args:
        target: ``HOST:PORT``.
        token: bearer token, when the service requires one.
        tls_ca: PEM file of the CA that signed the server certificate; enables TLS.
        tls_cert, tls_key: client certificate and key for mutual TLS.
        timeout: deadline in seconds for unary calls (streams are not limited).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        timeout: float | None = 60.0,
    ) -> None:
        options = [("grpc.max_receive_message_length", 64 << 20)]
        if tls_ca or tls_cert:
            read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
            creds = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.CompressorStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _calls(self) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e

    # -- blobs ----------------------------------------------------------------------------------------------

    def upload(self, path: str | os.PathLike[str], name: str | None = None) -> str:
        """Stream a file to the service (sha256 first, then 1 MiB chunks); return its blob id."""
        path = Path(path)
        size, sha = path.stat().st_size, file_sha256(path)

        def messages() -> Iterator[pb.UploadBlobRequest]:
            yield pb.UploadBlobRequest(metadata=pb.FileMetadata(name=name or path.name, size=size, sha256=sha))
            with open(path, "rb") as f:
                while block := f.read(CHUNK_SIZE):
                    yield pb.UploadBlobRequest(chunk=block)

        with self._calls():
            return self._stub.UploadBlob(messages(), metadata=self._metadata).blob_id

    def upload_model(self, model: str | os.PathLike[str]) -> pb.ModelInput:
        """Upload a model and every external-data file it names.

        Raises:
            BadInputError: not an ONNX model, or an external-data location outside the model's folder (a model
                must not make the client send arbitrary local files to a server); nothing is uploaded then.
        """
        model = Path(model)
        locations = external_files(model)  # checked before any byte leaves this machine
        files = [pb.InputFile(path=model.name, blob_id=self.upload(model))]
        for location in locations:
            files.append(pb.InputFile(path=location, blob_id=self.upload(model.parent / location, location)))
        return pb.ModelInput(model_path=model.name, files=files)

    def _upload_data(self, local: str, prefix: str) -> tuple[str, list[pb.InputFile]]:
        path = Path(local)
        if path.is_dir():
            base = f"{prefix}/{path.name}"
            items = sorted(p for p in path.rglob("*") if p.is_file())
            return base, [pb.InputFile(path=f"{base}/{p.relative_to(path).as_posix()}", blob_id=self.upload(p))
                          for p in items]
        if path.is_file():
            rel = f"{prefix}/{path.name}"
            return rel, [pb.InputFile(path=rel, blob_id=self.upload(path))]
        raise BadInputError(f"--{prefix.replace('_', '-')} {local!r} does not exist", field=prefix)

    # -- jobs -----------------------------------------------------------------------------------------------

    def submit(self, model: str | os.PathLike[str], spec: PruneSpec | None = None, *,
               output_name: str | None = None) -> JobInfo:
        """Upload the model (and calibration / training data named in ``spec``) and start a prune job."""
        spec = (spec or PruneSpec()).validate()
        inputs: list[pb.InputFile] = []
        paths: dict[str, str] = {}
        for option in DATA_OPTIONS:
            local = getattr(spec, option)
            if local and local != "random":
                paths[option], files = self._upload_data(local, option)
                inputs.extend(files)
        wire_spec = dataclasses.replace(spec, **paths)
        request = pb.SubmitJobRequest(model=self.upload_model(model), spec=spec_to_proto(wire_spec), inputs=inputs,
                                      output_name=output_name or "")
        with self._calls():
            return job_from_proto(self._stub.SubmitJob(request, metadata=self._metadata, timeout=self._timeout).job)

    def get(self, job_id: str) -> JobInfo:
        with self._calls():
            return job_from_proto(self._stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=self._metadata,
                                                    timeout=self._timeout).job)

    def list(self, limit: int = 100) -> builtins.list[JobInfo]:
        with self._calls():
            response = self._stub.ListJobs(pb.ListJobsRequest(limit=limit), metadata=self._metadata,
                                           timeout=self._timeout)
        return [job_from_proto(j) for j in response.jobs]

    def cancel(self, job_id: str) -> JobInfo:
        with self._calls():
            return job_from_proto(self._stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=self._metadata,
                                                       timeout=self._timeout).job)

    def watch(self, job_id: str) -> Iterator[JobEvent]:
        """Yield the job's state, progress and log lines until it ends."""
        with self._calls():
            for message in self._stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=self._metadata):
                yield JobEvent(job_from_proto(message.job), message.log_line)

    def wait(self, job_id: str, *, progress: ProgressFn | None = None,
             on_log: Callable[[str], None] | None = None) -> JobInfo:
        """Follow the job to its end and return it; raise the job's error if it did not succeed."""
        job = self.get(job_id)
        for event in self.watch(job_id):
            job = event.job
            if event.log_line:
                if on_log is not None:
                    on_log(event.log_line)
            elif progress is not None and job.stage:
                progress(Progress(job.stage, job.fraction, job.message))
        if not job.done:  # the stream ended early (server restart): ask once more
            job = self.get(job_id)
        if job.state != "SUCCEEDED":
            raise job_error(job)
        return job

    def download(self, job_id: str, name: str, dest: str | os.PathLike[str]) -> Path:
        """Stream one result file to ``dest`` (via a temporary file), verifying size and sha256."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        digest, received, meta = hashlib.sha256(), 0, None
        try:
            with self._calls(), open(tmp, "wb") as f:
                stream = self._stub.DownloadResult(pb.DownloadResultRequest(job_id=job_id, name=name),
                                                   metadata=self._metadata)
                for message in stream:
                    if message.WhichOneof("payload") == "metadata":
                        meta = message.metadata
                        continue
                    digest.update(message.chunk)
                    received += len(message.chunk)
                    f.write(message.chunk)
            if meta is None or received != meta.size or digest.hexdigest() != meta.sha256:
                raise ServiceError(f"download of {name} from job {job_id} is corrupt (size or sha256 mismatch)",
                                   code="DATA_LOSS")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def fetch(self, job_id: str, output: str | os.PathLike[str], *, report: str | os.PathLike[str] | None = None,
              job: JobInfo | None = None) -> builtins.list[Path]:
        """Download a succeeded job's results: the pruned model to ``output``, its external-data files beside
        it under their own names, and ``report.json`` to ``report`` (skipped when None)."""
        job = job or self.get(job_id)
        output = Path(output)
        written = []
        for result in job.results:
            if result.name == REPORT_NAME:
                if report is not None:
                    written.append(self.download(job_id, result.name, report))
            elif result.name == job.output_name:
                written.append(self.download(job_id, result.name, output))
            else:
                written.append(self.download(job_id, result.name, output.parent / result.name))
        return written

    def report(self, job_id: str) -> dict[str, Any]:
        """The report of a succeeded job."""
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(self.download(job_id, REPORT_NAME, Path(tmp) / REPORT_NAME).read_text())

    # -- whole operations ------------------------------------------------------------------------------------

    def prune(self, model_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
              spec: PruneSpec | None = None, *, progress: ProgressFn | None = None,
              on_log: Callable[[str], None] | None = None) -> PruneResult:
        """Like :func:`onnxprune.pipeline.prune`, run on the service; returns a ``PruneResult``.

        Raises:
            BadInputError, PlanError, UnsupportedOpError, …: what the job raised on the server.
            ServiceError: the service refused the request (status code in ``code``).
        """
        from onnxprune.pipeline import PruneResult

        job = self.submit(model_path, spec, output_name=Path(output_path).name)
        job = self.wait(job.job_id, progress=progress, on_log=on_log)
        self.fetch(job.job_id, output_path, job=job)
        return PruneResult(output_path=os.fspath(output_path), report=self.report(job.job_id))

    def analyze(
        self, model_path: str | os.PathLike[str], shapes: dict[str, builtins.list[int]] | None = None
    ) -> dict[str, Any]:
        """Like :func:`onnxprune.pipeline.analyze`, run on the service."""
        import json

        request = pb.AnalyzeRequest(model=self.upload_model(model_path))
        for name, dims in (shapes or {}).items():
            request.shapes[name].dims.extend(dims)
        with self._calls():
            return json.loads(self._stub.Analyze(request, metadata=self._metadata).report_json)
