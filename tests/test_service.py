"""The compression service against a real server on 127.0.0.1 (in-process, port 0).

Executor and store behaviour use the small job functions of ``service_tasks``; the end-to-end tests at the
bottom run the real pipeline. Restart after SIGKILL and SIGTERM are in ``test_service_restart.py``; the
600 MB round trip is in ``test_service_large.py``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from onnx import TensorProto, helper, numpy_helper

from onnxprune import cli
from onnxprune._proto import compressor_pb2 as pb
from onnxprune._proto import compressor_pb2_grpc as pb_grpc
from onnxprune.client import Client, JobFailedError, ServiceError
from onnxprune.errors import BadInputError, CancelledError, InvariantError, PlanError
from onnxprune.spec import PruneSpec
from onnxprune.service.server import CompressionServer, ServerConfig, create_server
from tests.service_tasks import (
    buggy_task,
    copy_task,
    crashing_task,
    failing_task,
    invariant_task,
    slow_task,
    stubborn_task,
)

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "digits_cnn.onnx"
MiB = 1 << 20


# -- fixtures -----------------------------------------------------------------------------------------------------

def tiny_model(path: Path, seed: int = 0, external: bool = False) -> Path:
    """A two-layer MLP; ``seed`` changes the weights (so different jobs have different bytes)."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, path)
    return path


ServerFactory = Callable[..., tuple[CompressionServer, str]]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """``start_server(task=..., store=..., **config)`` → (server, "127.0.0.1:PORT"); stopped after the test."""
    servers: list[CompressionServer] = []

    def start(task: Callable = copy_task, store: Path | None = None, address: str = "127.0.0.1:0",
              **config: object) -> tuple[CompressionServer, str]:
        config.setdefault("workers", 2)
        config.setdefault("cancel_grace_s", 2.0)
        server, port = create_server(address, store or tmp_path / "store", ServerConfig(**config), task=task)
        server.start()
        servers.append(server)
        return server, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=1.0)


def stub(target: str, token: str | None = None) -> tuple[pb_grpc.CompressorStub, tuple]:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return pb_grpc.CompressorStub(grpc.insecure_channel(target)), metadata


def upload_raw(stub_: pb_grpc.CompressorStub, data: bytes, *, name: str = "m.onnx", sha: str | None = None,
               size: int | None = None, metadata: tuple = ()) -> str:
    def messages() -> Iterator[pb.UploadBlobRequest]:
        yield pb.UploadBlobRequest(metadata=pb.FileMetadata(
            name=name, size=len(data) if size is None else size, sha256=sha or hashlib.sha256(data).hexdigest()))
        for i in range(0, len(data), MiB):
            yield pb.UploadBlobRequest(chunk=data[i : i + MiB])

    return stub_.UploadBlob(messages(), metadata=metadata).blob_id


def submit_raw(stub_: pb_grpc.CompressorStub, files: dict[str, str], model_path: str = "m.onnx",
               spec: pb.JobSpec | None = None, metadata: tuple = ()) -> pb.Job:
    request = pb.SubmitJobRequest(
        model=pb.ModelInput(model_path=model_path, files=[pb.InputFile(path=p, blob_id=b) for p, b in files.items()]),
        spec=spec or pb.JobSpec())
    return stub_.SubmitJob(request, metadata=metadata).job


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, str | None]:
    """Run a call that must fail; return (code, message, BadRequest field or None)."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    error = info.value
    field = None
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            field = bad.field_violations[0].field
    return error.code(), error.details(), field


def assert_serving(target: str, tmp_path: Path, token: str | None = None) -> None:
    """Health says SERVING and a small job still goes through end to end."""
    channel = grpc.insecure_channel(target)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with Client(target, token=token) as client:
        model = tiny_model(tmp_path / "ok" / "ok.onnx", seed=99)
        result = client.prune(model, tmp_path / "ok" / "out.onnx", PruneSpec())
        assert (tmp_path / "ok" / "out.onnx").read_bytes() == model.read_bytes()
        assert result.report["spec"]["ratio"] == 0.5


# -- health, reflection ------------------------------------------------------------------------------------------

def test_health_reports_each_service(start_server: ServerFactory) -> None:
    _, target = start_server()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    for service in ("", "onnxprune.v1.Compressor"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    code, _, _ = status_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services_and_describes_the_proto(start_server: ServerFactory) -> None:
    _, target = start_server()
    reflect = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(target))
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="onnxprune.v1.Compressor")]
    responses = list(reflect.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"onnxprune.v1.Compressor", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in responses[1].file_descriptor_response.file_descriptor_proto]
    assert any(f.package == "onnxprune.v1" and any(s.name == "Compressor" for s in f.service) for f in files)


# -- bad inputs --------------------------------------------------------------------------------------------------

def test_bad_inputs_get_the_right_status_and_the_server_keeps_serving(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    _, target = start_server(max_upload_bytes=4 * MiB)
    s, _ = stub(target)
    good = tiny_model(tmp_path / "good.onnx").read_bytes()

    # random bytes: the upload is just bytes, the job submission refuses them
    junk = upload_raw(s, np.random.default_rng(1).bytes(50_000))
    assert status_of(lambda: submit_raw(s, {"m.onnx": junk}))[::2] == (grpc.StatusCode.INVALID_ARGUMENT, "model")
    # truncated model
    cut = upload_raw(s, good[: len(good) - 100])
    code, message, field = status_of(lambda: submit_raw(s, {"m.onnx": cut}))
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "model") and "truncated" in message
    # external data pointing outside the upload
    evil = onnx.load_from_string(good)
    evil.graph.initializer[0].data_location = TensorProto.EXTERNAL
    evil.graph.initializer[0].ClearField("raw_data")
    evil.graph.initializer[0].external_data.add(key="location", value="../../etc/passwd")
    evil_id = upload_raw(s, evil.SerializeToString())
    code, message, field = status_of(lambda: submit_raw(s, {"m.onnx": evil_id}))
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "model") and "../../etc/passwd" in message
    # a chunk stream whose sha256 does not match its metadata
    code, message, field = status_of(lambda: upload_raw(s, good, sha="ab" * 32))
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "sha256") and "mismatch" in message
    # fewer bytes than declared
    assert status_of(lambda: upload_raw(s, good, size=len(good) + 1))[::2] == (grpc.StatusCode.INVALID_ARGUMENT, "size")
    # oversize upload: refused from the declared size, before any byte is stored
    big = os.urandom(5 * MiB)
    code, message, field = status_of(lambda: upload_raw(s, big))
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "size") and "exceeds the limit" in message
    # a chunk over 1 MiB
    code, _, field = status_of(lambda: s.UploadBlob(iter([
        pb.UploadBlobRequest(metadata=pb.FileMetadata(name="x", size=MiB + 1, sha256="0" * 64)),
        pb.UploadBlobRequest(chunk=b"x" * (MiB + 1))])))
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    # no metadata first
    assert status_of(lambda: s.UploadBlob(iter([pb.UploadBlobRequest(chunk=b"x")])))[::2] == (
        grpc.StatusCode.INVALID_ARGUMENT, "metadata")
    # unknown option value, bad paths, unknown blob
    model_id = upload_raw(s, good)
    code, message, field = status_of(lambda: submit_raw(s, {"m.onnx": model_id}, spec=pb.JobSpec(criterion="vibes")))
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "criterion") and "vibes" in message
    assert status_of(lambda: submit_raw(s, {"m.onnx": model_id}, spec=pb.JobSpec(ratio=1.5)))[2] == "ratio"
    assert status_of(lambda: submit_raw(s, {"../m.onnx": model_id}, model_path="../m.onnx"))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: submit_raw(s, {"m.onnx": "f" * 64}))[2] == "model.files"
    assert status_of(lambda: submit_raw(s, {"m.onnx": "not-a-hash"}))[2] == "blob_id"
    assert status_of(lambda: submit_raw(s, {"m.onnx": model_id}, spec=pb.JobSpec(calib="calib/none.npz")))[2] == "calib"
    # the Analyze RPC runs the same model checks
    code, _, field = status_of(lambda: s.Analyze(pb.AnalyzeRequest(
        model=pb.ModelInput(model_path="m.onnx", files=[pb.InputFile(path="m.onnx", blob_id=evil_id)]))))
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "model")
    # unknown job id, on every job RPC
    for call in (lambda: s.GetJob(pb.GetJobRequest(job_id="nope")),
                 lambda: s.CancelJob(pb.CancelJobRequest(job_id="nope")),
                 lambda: s.WatchJob(pb.WatchJobRequest(job_id="nope")),
                 lambda: s.DownloadResult(pb.DownloadResultRequest(job_id="nope", name="report.json"))):
        assert status_of(call)[0] == grpc.StatusCode.NOT_FOUND
    assert_serving(target, tmp_path)


def test_tokens_authenticate_and_isolate_tenants(start_server: ServerFactory, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, target = start_server(tokens={"tok-alice": "alice", "tok-bob": "bob"})
    s, _ = stub(target)
    model = tiny_model(tmp_path / "m.onnx")
    # missing and wrong tokens, on unary and streaming RPCs
    assert status_of(lambda: s.ListJobs(pb.ListJobsRequest()))[0] == grpc.StatusCode.UNAUTHENTICATED
    bad = (("authorization", "Bearer tok-alicf"),)
    assert status_of(lambda: s.ListJobs(pb.ListJobsRequest(), metadata=bad))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert status_of(lambda: upload_raw(s, b"x", metadata=bad))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert status_of(lambda: s.WatchJob(pb.WatchJobRequest(job_id="x"), metadata=bad))[0] == \
        grpc.StatusCode.UNAUTHENTICATED
    with Client(target, token="wrong") as client, pytest.raises(ServiceError) as info:
        client.list()
    assert info.value.code == "UNAUTHENTICATED"
    # health stays open for load balancers
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    # each tenant sees only its own jobs and uploads
    with Client(target, token="tok-alice") as alice, Client(target, token="tok-bob") as bob:
        job = alice.submit(model, PruneSpec())
        alice.wait(job.job_id)
        assert [j.job_id for j in alice.list()] == [job.job_id]
        assert bob.list() == []
        for action in (lambda: bob.get(job.job_id), lambda: bob.cancel(job.job_id),
                       lambda: bob.download(job.job_id, "report.json", tmp_path / "r.json")):
            with pytest.raises(ServiceError) as info:
                action()
            assert info.value.code == "NOT_FOUND"
        blob = hashlib.sha256(model.read_bytes()).hexdigest()
        s_bob = (("authorization", "Bearer tok-bob"),)
        assert status_of(lambda: submit_raw(s, {"m.onnx": blob}, metadata=s_bob))[2] == "model.files"
    # the CLI takes the token from --token or $ONNXPRUNE_TOKEN; a wrong one exits 2
    assert cli.main(["jobs", "list", "--server", target, "--token", "nope"]) == 2
    monkeypatch.setenv("ONNXPRUNE_TOKEN", "tok-alice")
    assert cli.main(["jobs", "list", "--server", target]) == 0
    assert_serving(target, tmp_path, token="tok-bob")


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, written as PEM files."""
    x509 = pytest.importorskip("cryptography.x509")
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    paths: dict[str, Path] = {}

    def key_and_pem(name: str) -> ec.EllipticCurvePrivateKey:
        key = ec.generate_private_key(ec.SECP256R1())
        paths[f"{name}_key"] = directory / f"{name}.key"
        paths[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        return key

    def cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
             issuer_key: ec.EllipticCurvePrivateKey | None, *, ca: bool = False,
             san: list[x509.GeneralName] | None = None) -> x509.Name:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        certificate = builder.sign(issuer_key or key, hashes.SHA256())
        paths[f"{name}_cert"] = directory / f"{name}.pem"
        paths[f"{name}_cert"].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return subject

    ca_key = key_and_pem("ca")
    ca_name = cert("ca", ca_key, None, None, ca=True)
    cert("server", key_and_pem("server"), ca_name, ca_key,
         san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert("client", key_and_pem("client"), ca_name, ca_key)
    return paths


def test_tls_and_mutual_tls(start_server: ServerFactory, tmp_path: Path) -> None:
    certs = _certificates(tmp_path)
    model = tiny_model(tmp_path / "m.onnx")
    _, target = start_server(store=tmp_path / "tls", tls_cert=certs["server_cert"], tls_key=certs["server_key"])
    with Client(target, tls_ca=certs["ca_cert"]) as client:
        job = client.submit(model, PruneSpec())
        assert client.wait(job.job_id).state == "SUCCEEDED"
    with Client(target, timeout=3) as plain, pytest.raises(ServiceError) as info:
        plain.list()
    assert info.value.code == "UNAVAILABLE"

    _, target = start_server(store=tmp_path / "mtls", tls_cert=certs["server_cert"], tls_key=certs["server_key"],
                             tls_client_ca=certs["ca_cert"])
    with Client(target, tls_ca=certs["ca_cert"], timeout=3) as no_cert, pytest.raises(ServiceError) as info:
        no_cert.list()
    assert info.value.code == "UNAVAILABLE"
    with Client(target, tls_ca=certs["ca_cert"], tls_cert=certs["client_cert"], tls_key=certs["client_key"]) as c:
        assert c.list() == []


# -- jobs: progress, cancellation, failures, retention, quota, load ----------------------------------------------

def test_watch_streams_progress_then_the_result(start_server: ServerFactory, tmp_path: Path) -> None:
    _, target = start_server(task=slow_task)
    with Client(target) as client:
        job = client.submit(tiny_model(tmp_path / "m.onnx"), PruneSpec(calib_samples=5))
        events = list(client.watch(job.job_id))
    stages = [(e.job.stage, e.job.fraction) for e in events if e.job.state == "RUNNING" and e.job.stage == "work"]
    assert [round(f, 1) for _, f in stages] == [0.0, 0.2, 0.4, 0.6, 0.8]
    final = events[-1].job
    assert final.state == "SUCCEEDED" and {r.name for r in final.results} == {"pruned.onnx", "report.json"}


def test_cancel_queued_and_running_jobs(start_server: ServerFactory, tmp_path: Path) -> None:
    server, target = start_server(task=slow_task, workers=1)
    model = tiny_model(tmp_path / "m.onnx")
    with Client(target) as client:
        running = client.submit(model, PruneSpec(calib_samples=300))  # 30 s unless cancelled
        queued = client.submit(model, PruneSpec(calib_samples=1))
        deadline = time.monotonic() + 20
        while client.get(running.job_id).state != "RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.cancel(queued.job_id).state == "CANCELLED"
        start = time.monotonic()
        client.cancel(running.job_id)
        with pytest.raises(CancelledError):
            client.wait(running.job_id)
        assert time.monotonic() - start < 5
        job = client.get(running.job_id)
        assert job.state == "CANCELLED" and job.results == []
        assert client.get(queued.job_id).state == "CANCELLED"
        # the slot is free again and the cancelled queued job never ran
        after = client.submit(model, PruneSpec(calib_samples=1))
        assert client.wait(after.job_id).state == "SUCCEEDED"
        assert client.get(queued.job_id).state == "CANCELLED"
        # cancelling a finished job changes nothing
        assert client.cancel(after.job_id).state == "SUCCEEDED"


def test_cancel_terminates_a_job_that_ignores_it(start_server: ServerFactory, tmp_path: Path) -> None:
    _, target = start_server(task=stubborn_task, cancel_grace_s=1.0)
    with Client(target) as client:
        job = client.submit(tiny_model(tmp_path / "m.onnx"), PruneSpec())
        while client.get(job.job_id).state != "RUNNING":
            time.sleep(0.05)
        start = time.monotonic()
        client.cancel(job.job_id)
        with pytest.raises(CancelledError):
            client.wait(job.job_id)
        assert time.monotonic() - start < 6


def test_job_failures_are_recorded_and_the_server_survives(start_server: ServerFactory, tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.onnx")
    _, target = start_server(task=failing_task, store=tmp_path / "fail")
    with Client(target) as client:
        job = client.submit(model, PruneSpec())
        with pytest.raises(PlanError, match="nothing to prune"):
            client.wait(job.job_id)
        info = client.get(job.job_id)
        assert (info.state, info.error_type) == ("FAILED", "PlanError")
        with pytest.raises(ServiceError) as not_ready:
            client.download(job.job_id, "report.json", tmp_path / "r.json")
        assert not_ready.value.code == "FAILED_PRECONDITION"
    _, target = start_server(task=crashing_task, store=tmp_path / "crash")
    with Client(target) as client:
        job = client.submit(model, PruneSpec())
        with pytest.raises(JobFailedError, match="died"):
            client.wait(job.job_id)
        assert client.get(job.job_id).error_type == "WorkerDied"
        assert client.list()[0].state == "FAILED"


def _error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


@pytest.mark.parametrize(
    ("task", "code", "reason", "exit_code"),
    [
        # the verify stage's failure on a pruned model onnxruntime cannot load: our bug, not the user's input
        (invariant_task, grpc.StatusCode.INTERNAL, "InvariantError", 1),
        (buggy_task, grpc.StatusCode.INTERNAL, "KeyError", 1),  # a plain bug inside the job
        (failing_task, grpc.StatusCode.FAILED_PRECONDITION, None, 2),  # the user's model: unchanged
    ],
    ids=["invariant", "bug", "user-error"],
)
def test_internal_failures_report_as_internal(
    start_server: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    task: Callable, code: grpc.StatusCode, reason: str | None, exit_code: int,
) -> None:
    _, target = start_server(task=task)
    model = tiny_model(tmp_path / "m.onnx")
    s, _ = stub(target)
    blob = upload_raw(s, model.read_bytes())
    request = pb.AnalyzeRequest(model=pb.ModelInput(model_path="m.onnx", files=[pb.InputFile(path="m.onnx",
                                                                                              blob_id=blob)]))
    with pytest.raises(grpc.RpcError) as info:
        s.Analyze(request)
    assert info.value.code() == code
    if reason is not None:
        assert info.value.details().startswith("internal error: ") and "please report" in info.value.details()
        error_info = _error_info(info.value)
        assert error_info is not None and (error_info.domain, error_info.reason) == ("onnxprune", reason)
    if task is invariant_task:  # the client raises what the embedded run raises, synchronous or as a job
        with Client(target) as client:
            with pytest.raises(InvariantError, match="cannot load the pruned model"):
                client.analyze(model)
            with pytest.raises(InvariantError, match="cannot load the pruned model"):
                client.wait(client.submit(model, PruneSpec()).job_id)
    capsys.readouterr()
    assert cli.main(["prune", str(model), "-o", str(tmp_path / "o.onnx"), "--server", target]) == exit_code
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert ("internal error" in err[0]) == (exit_code == 1)


def test_data_files_travel_with_the_job(start_server: ServerFactory, tmp_path: Path) -> None:
    _, target = start_server()
    calib = tmp_path / "calib"
    calib.mkdir()
    np.savez(calib / "a.npz", x=np.zeros((2, 16), np.float32))
    np.savez(calib / "b.npz", x=np.ones((2, 16), np.float32))
    train = tmp_path / "train.npz"
    np.savez(train, x=np.zeros((2, 16), np.float32), labels=np.zeros(2, np.int64))
    model = tiny_model(tmp_path / "m" / "ext.onnx", external=True)
    with Client(target) as client:
        result = client.prune(model, tmp_path / "out" / "p.onnx",
                              PruneSpec(calib=str(calib), finetune_steps=1, train_data=str(train)))
    report = result.report
    assert report["spec"]["calib"] == "calib/calib" and report["spec"]["train_data"] == "train_data/train.npz"
    assert {"ext.onnx", "ext.onnx.data", "calib/calib/a.npz", "calib/calib/b.npz",
            "train_data/train.npz"} <= set(report["inputs"])


def test_twenty_concurrent_clients_on_two_workers(start_server: ServerFactory, tmp_path: Path) -> None:
    server, target = start_server(workers=2)
    models = [tiny_model(tmp_path / f"m{i}" / "model.onnx", seed=i) for i in range(20)]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with Client(target) as client:
                result = client.prune(models[i], tmp_path / f"m{i}" / "out.onnx", PruneSpec(seed=i))
                assert result.report["spec"]["seed"] == i
                results[i] = result.output_path
        except BaseException as e:  # noqa: BLE001 - collected and re-raised below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 20
    for i in range(20):  # every client got its own model back, not another's
        assert (tmp_path / f"m{i}" / "out.onnx").read_bytes() == models[i].read_bytes()
    with Client(target) as client:
        jobs = client.list(limit=100)
    assert len(jobs) == 20 and len({j.job_id for j in jobs}) == 20
    assert all(j.state == "SUCCEEDED" for j in jobs)
    assert sorted(j.spec.seed for j in jobs) == list(range(20))
    assert time.monotonic() - start < 100


def test_retention_expires_results_and_frees_blobs(start_server: ServerFactory, tmp_path: Path) -> None:
    stray = os.urandom(100)  # a blob written just before a crash, never recorded in the job store
    stray_id = hashlib.sha256(stray).hexdigest()
    (tmp_path / "store" / "blobs" / stray_id[:2]).mkdir(parents=True)
    (tmp_path / "store" / "blobs" / stray_id[:2] / stray_id).write_bytes(stray)
    server, target = start_server(retention_s=60.0)
    with Client(target) as client:
        job = client.submit(tiny_model(tmp_path / "m.onnx"), PruneSpec())
        job = client.wait(job.job_id)
        assert job.expires is not None and 55 < job.expires - job.finished < 65
        assert server.manager.sweep() == (0, 0)
        expired, deleted = server.manager.sweep(now=time.time() + 120)
        # the upload (= the copied model: same content), the report, the stray blob
        assert expired == 1 and deleted == 3
        assert client.get(job.job_id).state == "EXPIRED"
        with pytest.raises(ServiceError) as info:
            client.download(job.job_id, "report.json", tmp_path / "r.json")
        assert info.value.code == "NOT_FOUND"
    assert not any((tmp_path / "store" / "blobs").glob("*/*"))


def test_quota_full_gives_resource_exhausted(start_server: ServerFactory, tmp_path: Path) -> None:
    _, target = start_server(quota_bytes=3 * MiB, max_upload_bytes=3 * MiB)
    s, _ = stub(target)
    upload_raw(s, os.urandom(2 * MiB))
    code, message, _ = status_of(lambda: upload_raw(s, os.urandom(2 * MiB)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "store is full" in message
    assert_serving(target, tmp_path)


def test_graceful_stop_finishes_running_jobs(start_server: ServerFactory, tmp_path: Path) -> None:
    server, target = start_server(task=slow_task, workers=1)
    with Client(target) as client:
        job = client.submit(tiny_model(tmp_path / "m.onnx"), PruneSpec(calib_samples=15))
        while client.get(job.job_id).state != "RUNNING":
            time.sleep(0.05)
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 20.0})
        stopper.start()
        time.sleep(0.3)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(ServiceError) as info:
            client.submit(tiny_model(tmp_path / "m2.onnx"), PruneSpec())
        assert info.value.code == "UNAVAILABLE"
        stopper.join(30)
    store = server.manager._store  # the server is down; read the record directly
    from onnxprune.service.store import SqliteJobStore

    record = SqliteJobStore(tmp_path / "store" / "jobs.sqlite").get(job.job_id)
    assert record is not None and record.state == "SUCCEEDED"
    del store


# -- end to end through the real pipeline ------------------------------------------------------------------------

def test_remote_prune_gives_the_same_model_as_embedded(start_server: ServerFactory, tmp_path: Path) -> None:
    from onnxprune import pipeline
    from onnxprune.service.tasks import run_task

    _, target = start_server(task=run_task)
    spec = PruneSpec(ratio=0.3, criterion="l1")
    embedded = pipeline.prune(DIGITS, tmp_path / "embedded" / "pruned.onnx", spec)
    with Client(target) as client:
        progress: list[str] = []
        logs: list[str] = []
        remote = client.prune(DIGITS, tmp_path / "remote" / "pruned.onnx", spec,
                              progress=lambda p: progress.append(p.stage), on_log=logs.append)
    assert (tmp_path / "remote" / "pruned.onnx").read_bytes() == (tmp_path / "embedded" / "pruned.onnx").read_bytes()
    assert remote.report["pruned"] == embedded.report["pruned"]
    assert remote.report["groups"] == embedded.report["groups"]
    assert {"load", "cut", "verify", "done"} <= set(progress)
    assert any("onnxprune.pipeline" in line for line in logs), logs


def test_cli_remote_prune_analyze_and_jobs(start_server: ServerFactory, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from onnxprune.service.tasks import run_task

    _, target = start_server(task=run_task)
    out_remote, out_local = tmp_path / "r" / "p.onnx", tmp_path / "l" / "p.onnx"
    assert cli.main(["prune", str(DIGITS), "-o", str(out_local), "--ratio", "0.4",
                     "--report", str(tmp_path / "l.json")]) == 0
    local_out = capsys.readouterr().out
    assert cli.main(["prune", str(DIGITS), "-o", str(out_remote), "--ratio", "0.4", "--server", target,
                     "--report", str(tmp_path / "r.json")]) == 0
    remote_out = capsys.readouterr().out
    assert out_remote.read_bytes() == out_local.read_bytes()
    assert remote_out.replace(str(out_remote), "OUT").replace(str(tmp_path / "r.json"), "REP").splitlines()[-1] == \
        local_out.replace(str(out_local), "OUT").replace(str(tmp_path / "l.json"), "REP").splitlines()[-1]
    assert json.loads((tmp_path / "r.json").read_text())["pruned"] == \
        json.loads((tmp_path / "l.json").read_text())["pruned"]

    assert cli.main(["analyze", str(DIGITS), "--json"]) == 0
    local_analysis = json.loads(capsys.readouterr().out)
    assert cli.main(["analyze", str(DIGITS), "--json", "--server", target]) == 0
    assert json.loads(capsys.readouterr().out)["groups"] == local_analysis["groups"]

    assert cli.main(["jobs", "list", "--server", target]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "SUCCEEDED" in lines[1]
    job_id = lines[1].split()[0]
    assert cli.main(["jobs", "show", job_id, "--server", target]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["ratio"] == 0.4
    fetched = tmp_path / "f" / "again.onnx"
    assert cli.main(["jobs", "fetch", job_id, "-o", str(fetched), "--server", target]) == 0
    assert fetched.read_bytes() == out_local.read_bytes()
    assert (tmp_path / "f" / "again.report.json").exists()
    assert cli.main(["jobs", "cancel", job_id, "--server", target]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    # bad input exits 2 with one line; an unknown job too
    assert cli.main(["jobs", "show", "nope", "--server", target]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(1000))
    assert cli.main(["prune", str(junk), "-o", str(tmp_path / "x.onnx"), "--server", target]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


def test_remote_job_errors_match_embedded_errors(start_server: ServerFactory, tmp_path: Path) -> None:
    """A model the pipeline refuses (not the service's checks) fails the job with the pipeline's error type."""
    from onnxprune.service.tasks import run_task

    _, target = start_server(task=run_task)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    from onnxprune import pipeline

    with pytest.raises(Exception) as embedded:
        pipeline.prune(path, tmp_path / "e.onnx", PruneSpec())
    with Client(target) as client, pytest.raises(Exception) as remote:
        client.prune(path, tmp_path / "r.onnx", PruneSpec())
    assert type(remote.value) is type(embedded.value)
    assert isinstance(remote.value, (BadInputError, PlanError))


def test_stop_interrupts_jobs_past_the_grace_and_requeues_them(start_server: ServerFactory, tmp_path: Path) -> None:
    server, target = start_server(task=slow_task, workers=1, store=tmp_path / "s")
    with Client(target) as client:
        job = client.submit(tiny_model(tmp_path / "m.onnx"), PruneSpec(calib_samples=300))
        while client.get(job.job_id).state != "RUNNING":
            time.sleep(0.05)
    start = time.monotonic()
    server.stop(grace=0.5)
    assert time.monotonic() - start < 10
    from onnxprune.service.store import SqliteJobStore

    record = SqliteJobStore(tmp_path / "s" / "jobs.sqlite").get(job.job_id)
    assert record is not None and record.state == "QUEUED" and "interrupted" in record.message


def test_full_queue_gives_resource_exhausted(start_server: ServerFactory, tmp_path: Path) -> None:
    _, target = start_server(task=slow_task, workers=1, queue_size=1)
    model = tiny_model(tmp_path / "m.onnx")
    with Client(target) as client:
        running = client.submit(model, PruneSpec(calib_samples=100))
        while client.get(running.job_id).state != "RUNNING":
            time.sleep(0.05)
        client.submit(model, PruneSpec(calib_samples=1))
        with pytest.raises(ServiceError) as info:
            client.submit(model, PruneSpec(calib_samples=1))
        assert info.value.code == "RESOURCE_EXHAUSTED" and "queue is full" in str(info.value)
        client.cancel(running.job_id)


def test_a_port_in_use_is_a_clear_error(start_server: ServerFactory, tmp_path: Path) -> None:
    _, target = start_server()
    with pytest.raises(BadInputError, match="cannot listen"):
        start_server(store=tmp_path / "other", address=target)


def test_python_metrics_need_the_servers_opt_in_naming_the_module(start_server: ServerFactory, tmp_path: Path,
                                                                   digits, capsys: pytest.CaptureFixture[str]) -> None:
    """A python: metric runs code on the server: PERMISSION_DENIED unless `serve --allow-metric-module` names it."""
    from onnxprune.service.tasks import run_task
    from tests.data import write_npz

    _, _, x_test, y_test = digits
    eval_data = write_npz(tmp_path / "eval.npz", x_test[:200], y_test[:200])
    spec = PruneSpec(ratio=0.25, eval_data=str(eval_data), metric="python:tests.metric_fns:accuracy", device="cpu")
    for i, allowed in enumerate(((), ("tests.other_metrics",), ("tests",))):
        _, target = start_server(task=run_task, store=tmp_path / f"store{i}", metric_modules=allowed)
        s, _ = stub(target)
        with pytest.raises(grpc.RpcError) as raw:  # refused before anything is looked at: no upload needed
            submit_raw(s, {}, spec=pb.JobSpec(metric="python:tests.metric_fns:accuracy", eval_data="eval/e.npz"))
        assert raw.value.code() == grpc.StatusCode.PERMISSION_DENIED, raw.value.details()
        message = raw.value.details()
        assert "'tests.metric_fns' is not allowed" in message
        assert ("--allow-metric-module" in message) if not allowed else (allowed[0] in message)
        info = error_details_pb2.ErrorInfo()
        details = rpc_status.from_call(raw.value).details
        assert details and details[0].Unpack(info) and info.reason == "METRIC_MODULE_NOT_ALLOWED"
        assert info.metadata["module"] == "tests.metric_fns" and info.metadata["allowed"] == ",".join(allowed)
        with Client(target) as client, pytest.raises(ServiceError) as refused:
            client.submit(DIGITS, spec)
        assert refused.value.code == "PERMISSION_DENIED"
        assert cli.main(["prune", str(DIGITS), "-o", str(tmp_path / "cli.onnx"), "--server", target,
                         "--eval-data", str(eval_data), "--metric", "python:tests.metric_fns:accuracy"]) == 2
        assert "PERMISSION_DENIED" in capsys.readouterr().err
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    # built-in metrics need no opt-in; the named module runs where the server allows it
    _, target = start_server(task=run_task, store=tmp_path / "allowed", metric_modules=("tests.metric_fns",))
    with Client(target) as client:
        builtin = client.prune(DIGITS, tmp_path / "b" / "p.onnx", PruneSpec(ratio=0.25, eval_data=str(eval_data),
                                                                            metric="top1", device="cpu"))
        result = client.prune(DIGITS, tmp_path / "r" / "p.onnx", spec)
    metric = result.report["metric"]
    assert metric["name"] == "python:tests.metric_fns:accuracy" and "eval.npz" in metric["data"]
    assert metric["original"] == pytest.approx(builtin.report["metric"]["original"])
    assert metric["pruned"] == pytest.approx(builtin.report["metric"]["pruned"])
