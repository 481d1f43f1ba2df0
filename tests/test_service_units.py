"""Unit tests of the service's parts without a network: stubs, spec mapping, error mapping, model checks,
blob store, job store, tokens."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.rpc import code_pb2, error_details_pb2
from onnx import TensorProto, helper, numpy_helper

from onnxprune._proto import compressor_pb2 as pb
from onnxprune._proto.convert import spec_from_proto, spec_to_proto
from onnxprune.errors import (
    BadInputError,
    CancelledError,
    InvariantError,
    PlanError,
    SurgeryError,
    UnsupportedOpError,
)
from onnxprune.io.safety import external_files
from onnxprune.spec import PruneSpec
from onnxprune.service.auth import Authenticator, load_tokens
from onnxprune.service.blobs import DirBlobStore
from onnxprune.service.errors import NotFoundError, PermissionDeniedError, ResourceExhaustedError, to_status
from onnxprune.service.modelcheck import check_model
from onnxprune.service.store import FAILED, QUEUED, RUNNING, SUCCEEDED, JobRecord, ResultFile, SqliteJobStore

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "protos"))
import generate  # noqa: E402


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    for name in generate.STUBS:
        assert (tmp_path / name).read_text() == (REPO / "onnxprune" / "_proto" / name).read_text(), (
            f"onnxprune/_proto/{name} is stale: run `python protos/generate.py` and commit the result"
        )


def test_jobspec_has_exactly_the_prunespec_fields() -> None:
    assert {f.name for f in pb.JobSpec.DESCRIPTOR.fields} == {f.name for f in dataclasses.fields(PruneSpec)}


def test_spec_round_trip_keeps_every_option() -> None:
    spec = PruneSpec(ratio=0.25, criterion="taylor", global_ranking=True, target_macs=0.5, target_params=0.6,
                     target_latency=0.7, round_to=8, exclude=["head*", "stem"], granularity="2:4", sparsity=0.5,
                     depth=2, shapes={"x": [1, 3, 32, 32]}, calib="calib/a.npz", calib_samples=16, reconstruct=True,
                     finetune_steps=5, train_data="train_data/t.npz", lr=0.01, batch_size=4, iterations=2,
                     bench=True, device="cpu", seed=7, fidelity_samples=3)
    assert spec_from_proto(spec_to_proto(spec)) == spec
    assert spec_from_proto(pb.JobSpec()) == PruneSpec()
    task = PruneSpec(eval_data="eval_data/v.npz", metric="python:mymetrics:char_accuracy", max_drop=1.5)
    assert spec_from_proto(spec_to_proto(task)) == task


def test_python_metrics_pass_only_for_the_named_modules() -> None:
    from onnxprune.service.jobs import check_metric_allowed

    user = PruneSpec(metric="python:pkg.metrics:f1", eval_data="e.npz")
    check_metric_allowed(user, frozenset({"pkg.metrics"}))
    check_metric_allowed(PruneSpec(metric="top1", eval_data="e.npz"), frozenset())
    for allowed in (frozenset(), frozenset({"pkg"}), frozenset({"pkg.metrics.sub", "other"})):
        with pytest.raises(PermissionDeniedError) as info:
            check_metric_allowed(user, allowed)
        assert info.value.reason == "METRIC_MODULE_NOT_ALLOWED" and info.value.metadata["module"] == "pkg.metrics"


def test_serve_names_the_metric_modules_it_allows() -> None:
    from onnxprune.cli import build_parser
    from onnxprune.service.server import config_from_args

    args = build_parser().parse_args(["serve", "--allow-metric-module", "mymetrics",
                                      "--allow-metric-module", "pkg.metrics"])
    assert config_from_args(args).metric_modules == ("mymetrics", "pkg.metrics")
    assert config_from_args(build_parser().parse_args(["serve"])).metric_modules == ()
    with pytest.raises(BadInputError) as info:
        config_from_args(build_parser().parse_args(["serve", "--allow-metric-module", "my-metrics.py"]))
    assert info.value.field == "allow_metric_module"


def test_unknown_option_value_names_the_field() -> None:
    with pytest.raises(BadInputError) as info:
        spec_from_proto(pb.JobSpec(criterion="telepathy"))
    assert info.value.field == "criterion"


def test_to_status_maps_each_error_kind() -> None:
    status = to_status(BadInputError("bad ratio", field="ratio"))
    assert status.code == code_pb2.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "ratio" and "bad ratio" in bad.field_violations[0].description
    assert to_status(NotFoundError("x")).code == code_pb2.NOT_FOUND
    assert to_status(ResourceExhaustedError("x")).code == code_pb2.RESOURCE_EXHAUSTED
    assert to_status(PlanError("x")).code == code_pb2.FAILED_PRECONDITION
    assert to_status(UnsupportedOpError("x")).code == code_pb2.FAILED_PRECONDITION
    assert to_status(CancelledError("x")).code == code_pb2.CANCELLED
    denied = to_status(PermissionDeniedError("no", reason="METRIC_MODULE_NOT_ALLOWED", metadata={"module": "m"}))
    info = error_details_pb2.ErrorInfo()
    assert denied.code == code_pb2.PERMISSION_DENIED and denied.details[0].Unpack(info)
    assert (info.reason, dict(info.metadata)) == ("METRIC_MODULE_NOT_ALLOWED", {"module": "m"})
    assert to_status(SurgeryError("x")).code == code_pb2.INTERNAL
    bug = to_status(KeyError("secret internals"))
    assert bug.code == code_pb2.INTERNAL and "secret" not in bug.message and "please report" in bug.message
    ours = to_status(InvariantError("onnxruntime cannot load the pruned model"))
    assert ours.code == code_pb2.INTERNAL
    assert ours.message == "internal error: onnxruntime cannot load the pruned model; please report it"
    for status, reason in ((ours, "InvariantError"), (bug, "KeyError")):
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info) and (info.domain, info.reason) == ("onnxprune", reason)


# -- model checks ---------------------------------------------------------------------------------------------

def _external_model(tmp_path: Path, location: str = "m.data") -> tuple[Path, dict[str, int]]:
    w = numpy_helper.from_array(np.ones((16, 8), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    if location != "m.data":
        model = onnx.load(tmp_path / "m.onnx", load_external_data=False)
        for entry in model.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save(model, tmp_path / "m.onnx")
    return tmp_path / "m.onnx", {"m.onnx": 1, "m.data": (tmp_path / "m.data").stat().st_size}


def test_model_check_accepts_external_data_next_to_the_model(tmp_path: Path) -> None:
    path, files = _external_model(tmp_path)
    (tensor,) = check_model(path, model_path="m.onnx", files=files, max_tensor_bytes=1 << 20)
    assert tensor.name == "W" and tensor.dims == [16, 8] and tensor.declared_bytes == 512


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../x", "C:\\x", "..\\x"])
def test_model_check_refuses_escaping_external_paths(tmp_path: Path, location: str) -> None:
    path, files = _external_model(tmp_path, location)
    with pytest.raises(BadInputError, match="location|absolute|leaves") as info:
        check_model(path, model_path="m.onnx", files=files, max_tensor_bytes=1 << 20)
    assert info.value.field == "model"


def test_model_check_refuses_missing_and_short_external_files(tmp_path: Path) -> None:
    path, files = _external_model(tmp_path)
    with pytest.raises(BadInputError, match="not uploaded"):
        check_model(path, model_path="m.onnx", files={"m.onnx": 1}, max_tensor_bytes=1 << 20)
    with pytest.raises(BadInputError, match="outside"):
        check_model(path, model_path="m.onnx", files={"m.onnx": 1, "m.data": 100}, max_tensor_bytes=1 << 20)


def test_model_check_refuses_huge_declared_tensors_without_reading_them(tmp_path: Path) -> None:
    path, files = _external_model(tmp_path)
    with pytest.raises(BadInputError, match="declares 512 bytes"):
        check_model(path, model_path="m.onnx", files=files, max_tensor_bytes=100)
    big = TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20])
    graph = helper.make_graph([helper.make_node("Identity", ["huge"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [big])
    onnx.save(helper.make_model(graph), tmp_path / "huge.onnx")
    with pytest.raises(BadInputError, match="'huge' declares 4398046511104 bytes"):
        check_model(tmp_path / "huge.onnx", model_path="huge.onnx", files={}, max_tensor_bytes=1 << 33)


def test_model_check_refuses_garbage_and_truncation(tmp_path: Path) -> None:
    path, files = _external_model(tmp_path)
    data = path.read_bytes()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="truncated|not an ONNX"):
        check_model(tmp_path / "t.onnx", model_path="t.onnx", files=files, max_tensor_bytes=1 << 20)
    rng = np.random.default_rng(0)
    for seed in range(20):
        (tmp_path / "r.onnx").write_bytes(rng.bytes(4096 + seed))
        with pytest.raises(BadInputError):
            check_model(tmp_path / "r.onnx", model_path="r.onnx", files={}, max_tensor_bytes=1 << 20)
    (tmp_path / "e.onnx").write_bytes(b"")
    with pytest.raises(BadInputError, match="empty"):
        check_model(tmp_path / "e.onnx", model_path="e.onnx", files={}, max_tensor_bytes=1 << 20)


# -- blob store -------------------------------------------------------------------------------------------------

def _chunks(data: bytes, size: int = 1 << 20) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_blob_store_verifies_and_deduplicates(tmp_path: Path) -> None:
    store = DirBlobStore(tmp_path, quota_bytes=10 << 20, max_upload_bytes=5 << 20)
    data = os.urandom(3 << 20)
    sha = hashlib.sha256(data).hexdigest()
    info = store.put_stream(_chunks(data), size=len(data), sha256=sha)
    assert info.blob_id == sha and store.usage() == len(data)
    store.put_stream(_chunks(data), size=len(data), sha256=sha)
    assert store.usage() == len(data)
    assert b"".join(store.read(sha)) == data
    with pytest.raises(BadInputError) as info_sha:
        store.put_stream(_chunks(data), size=len(data), sha256="0" * 64)
    assert info_sha.value.field == "sha256"
    with pytest.raises(BadInputError, match="ended after"):
        store.put_stream(_chunks(data[:-1]), size=len(data), sha256=sha)
    with pytest.raises(BadInputError, match="more than the declared"):
        store.put_stream(_chunks(data + b"x"), size=len(data), sha256=sha)
    with pytest.raises(BadInputError, match="exceeds the limit"):
        store.put_stream([], size=6 << 20, sha256=sha)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_blob_store_quota_counts_stored_blobs(tmp_path: Path) -> None:
    store = DirBlobStore(tmp_path, quota_bytes=4 << 20, max_upload_bytes=4 << 20)
    data = os.urandom(3 << 20)
    store.put_stream(_chunks(data), size=len(data), sha256=hashlib.sha256(data).hexdigest())
    more = os.urandom(2 << 20)
    with pytest.raises(ResourceExhaustedError, match="store is full"):
        store.put_stream(_chunks(more), size=len(more), sha256=hashlib.sha256(more).hexdigest())
    store.delete(hashlib.sha256(data).hexdigest())
    store.put_stream(_chunks(more), size=len(more), sha256=hashlib.sha256(more).hexdigest())
    reopened = DirBlobStore(tmp_path, quota_bytes=4 << 20, max_upload_bytes=4 << 20)
    assert reopened.usage() == len(more)


# -- job store --------------------------------------------------------------------------------------------------

def _record(job_id: str, tenant: str = "a", state: str = QUEUED) -> JobRecord:
    return JobRecord(job_id=job_id, tenant=tenant, kind="prune", spec=PruneSpec().to_dict(), model_path="m.onnx",
                     inputs={"m.onnx": "1" * 64}, output_name="p.onnx", state=state, created=time.time())


def test_job_store_survives_reopen_and_recovers(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    store.create(_record("done"))
    store.update("done", state=SUCCEEDED, results=[ResultFile("p.onnx", 3, "2" * 64)], finished=time.time())
    store.create(_record("running"))
    store.update("running", state=RUNNING)
    store.create(_record("waiting"))
    store.close()
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    failed, queued = store.recover("server died")
    assert failed == ["running"] and [r.job_id for r in queued] == ["waiting"]
    assert store.get("running").state == FAILED and store.get("running").error == "server died"
    assert store.get("done").results == [ResultFile("p.onnx", 3, "2" * 64)]


def test_job_store_isolates_tenants_and_compares_and_sets(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    store.create(_record("j1", tenant="a"))
    assert store.get("j1", "b") is None and store.get("j1", "a") is not None
    assert store.list_jobs("b", 10) == [] and len(store.list_jobs("a", 10)) == 1
    assert store.update("j1", only_if=[QUEUED], state=RUNNING)
    assert not store.update("j1", only_if=[QUEUED], state=RUNNING)
    store.add_blob("3" * 64, 10, "a")
    assert store.owns("a", "3" * 64) and not store.owns("b", "3" * 64)


def test_job_store_expires_and_finds_unreferenced_blobs(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    store.add_blob("1" * 64, 10, "a")  # the input of the job below
    store.add_blob("4" * 64, 10, "a")  # an upload no job uses
    store.create(_record("old"))
    store.update("old", state=SUCCEEDED, finished=time.time() - 100, results=[ResultFile("p.onnx", 1, "2" * 64)])
    store.add_blob("2" * 64, 1, None)
    later = time.time() + 1
    assert sorted(store.unreferenced_blobs(later)) == ["4" * 64]
    assert store.expire(time.time() - 50) == ["old"]
    assert sorted(store.unreferenced_blobs(later)) == ["1" * 64, "2" * 64, "4" * 64]


# -- tokens -----------------------------------------------------------------------------------------------------

def test_token_file_and_constant_time_lookup(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# tenants\nalice tok-a\nbob tok-b  # comment\n\nsolo-token\n")
    tokens = load_tokens(path)
    assert tokens == {"tok-a": "alice", "tok-b": "bob", "solo-token": "default"}
    auth = Authenticator(tokens)
    assert auth.tenant([("authorization", "Bearer tok-b")]) == "bob"
    assert auth.tenant([("authorization", "bearer tok-a")]) == "alice"
    assert auth.tenant([("authorization", "Bearer tok-")]) is None
    assert auth.tenant([("authorization", "Bearer ")]) is None
    assert auth.tenant([]) is None
    assert Authenticator(None).tenant([]) == "default"
    path.write_text("a b c\n")
    with pytest.raises(BadInputError, match="expected"):
        load_tokens(path)


def test_client_finds_external_data_and_refuses_to_upload_escaping_paths(tmp_path: Path) -> None:
    from onnxprune.client import Client

    path, _ = _external_model(tmp_path)
    assert external_files(path) == ["m.data"]
    (tmp_path / "evil").mkdir()
    evil, _ = _external_model(tmp_path / "evil", "../../etc/passwd")
    with Client("127.0.0.1:1") as client, pytest.raises(BadInputError, match="outside the model's folder"):
        client.upload_model(evil)  # refused before any connection is tried
