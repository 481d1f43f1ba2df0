"""The shared job store (PostgreSQL, a real server started by the ``postgres`` fixture) and the shared blob stores
(a folder several replicas use, and S3-compatible object storage through fsspec against a local moto server)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from onnxprune.errors import BadInputError, InvariantError
from onnxprune.service.blobs import DirBlobStore, FsspecBlobStore, open_blob_store
from onnxprune.service.errors import NotFoundError, ResourceExhaustedError, UnavailableError
from onnxprune.service.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobRecord, ResultFile

pytestmark = pytest.mark.cluster
psycopg = pytest.importorskip("psycopg")

from onnxprune.service.pgstore import _MIGRATIONS, PostgresJobStore  # noqa: E402


def record(job_id: str, tenant: str = "t1", created: float | None = None, blob: str = "a" * 64) -> JobRecord:
    return JobRecord(job_id=job_id, tenant=tenant, kind="prune", spec={"ratio": 0.5}, model_path="m.onnx",
                     inputs={"m.onnx": blob}, output_name="out.onnx", created=created or time.time())


@pytest.fixture
def db_url(postgres) -> str:
    return postgres.new_database()


@pytest.fixture
def stores(db_url: str) -> Iterator[list[PostgresJobStore]]:
    opened = [PostgresJobStore(db_url, replica_id=f"replica-{i}") for i in range(2)]
    yield opened
    for store in opened:
        store.close()


def test_schema_is_created_once_and_records_round_trip(db_url: str, stores: list[PostgresJobStore]) -> None:
    a, _ = stores
    again = PostgresJobStore(db_url, replica_id="late")  # a third replica starting on a migrated database
    again.close()
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == len(_MIGRATIONS)
    rec = record("j1")
    a.create(rec)
    assert a.get("j1") == rec
    assert a.update("j1", results=[ResultFile("out.onnx", 3, "b" * 64)], report={"macs": 1}, state=SUCCEEDED)
    got = a.get("j1")
    assert got.results == [ResultFile("out.onnx", 3, "b" * 64)] and got.report == {"macs": 1}


def test_an_older_schema_is_migrated_on_start(postgres) -> None:
    url = postgres.new_database()
    with psycopg.connect(url, autocommit=True) as conn:  # a database a version-1 replica created
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute(_MIGRATIONS[0])
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute("INSERT INTO jobs (job_id, tenant, kind, state, spec, model_path, inputs, output_name, stage, "
                     "fraction, message, error, error_type, error_field, results, created, finished) VALUES ('old', 't1', "
                     "'prune', 'SUCCEEDED', '{}', 'm.onnx', '{}', 'out.onnx', '', 1, '', '', '', '', '[]', 1, 2)")
    store = PostgresJobStore(url, replica_id="new")
    try:
        store.add_logs([("old", "first"), ("old", "second")])
        assert [line for _, line in store.logs_since("old", 0)] == ["first", "second"]
        assert store.get("old").state == SUCCEEDED
        assert store.expire(time.time()) == ["old"] and store.logs_since("old", 0) == []  # logs go with results
    finally:
        store.close()
    with psycopg.connect(url) as conn:
        assert [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2]


def test_tenants_are_isolated_and_updates_compare_and_set(stores: list[PostgresJobStore]) -> None:
    a, b = stores
    a.create(record("j1", tenant="alice"))
    a.add_blob("c" * 64, 10, "alice")
    assert b.get("j1", "bob") is None and b.get("j1", "alice") is not None
    assert [r.job_id for r in b.list_jobs("bob", 10)] == [] and len(b.list_jobs("alice", 10)) == 1
    assert b.owns("alice", "c" * 64) and not b.owns("bob", "c" * 64)
    assert not b.update("j1", only_if=[RUNNING], state=FAILED)
    assert b.update("j1", only_if=[QUEUED], state=CANCELLED)
    assert a.get("j1").state == CANCELLED
    with pytest.raises(ValueError, match="unknown job columns"):
        a.update("j1", owner="x")


def test_two_replicas_never_claim_one_job(stores: list[PostgresJobStore]) -> None:
    a, b = stores
    for i in range(60):
        a.create(record(f"j{i:02d}", created=1000.0 + i))
    claims: dict[str, list[str]] = {"replica-0": [], "replica-1": []}

    def claim_all(store: PostgresJobStore) -> None:
        while got := store.claim(3):
            claims[store.replica_id] += [r.job_id for r in got]

    threads = [threading.Thread(target=claim_all, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    taken = claims["replica-0"] + claims["replica-1"]
    assert sorted(taken) == [f"j{i:02d}" for i in range(60)]  # each exactly once
    # A job is updated by its owner only.
    job = taken[0]
    owner, other = (a, b) if job in claims["replica-0"] else (b, a)
    assert not other.update(job, owned_by=other.replica_id, state=RUNNING)
    assert owner.update(job, owned_by=owner.replica_id, state=RUNNING)


def test_a_claim_skips_a_job_another_replica_is_claiming(db_url: str, stores: list[PostgresJobStore]) -> None:
    a, b = stores
    a.create(record("first", created=1.0))
    a.create(record("second", created=2.0))
    with psycopg.connect(db_url) as conn, conn.transaction():  # replica A, in the middle of its claim
        conn.execute("SELECT job_id FROM jobs WHERE job_id = 'first' FOR UPDATE")
        started = time.monotonic()
        assert [r.job_id for r in b.claim(2)] == ["second"]  # not blocked, and not the locked one
        assert time.monotonic() - started < 5
    assert [r.job_id for r in a.claim(2)] == ["first"]


def test_a_dead_replicas_jobs_are_requeued_once_then_failed(stores: list[PostgresJobStore]) -> None:
    a, b = stores
    a.heartbeat()
    b.heartbeat()
    a.create(record("running"))
    a.create(record("waiting", created=time.time() + 1))
    assert [r.job_id for r in a.claim(2)] == ["running", "waiting"]
    a.update("running", state=RUNNING, owned_by="replica-0")
    assert b.reclaim(stale_after_s=60, max_attempts=2, reason="lost") == ([], [])  # a is alive
    time.sleep(1.2)
    b.heartbeat()
    requeued, failed = b.reclaim(stale_after_s=1.0, max_attempts=2, reason="lost")
    assert (requeued, failed) == (["running"], [])
    assert {r.job_id for r in b.claim(5)} == {"running", "waiting"}  # the waiting one is free again too
    b.update("running", state=RUNNING, owned_by="replica-1")
    assert not a.update("running", owned_by="replica-0", state=SUCCEEDED)  # the presumed-dead owner lost it
    # The second owner dies too: the job has had its two runs and fails with the reason.
    a.heartbeat()
    time.sleep(1.2)
    a.heartbeat()
    requeued, failed = a.reclaim(stale_after_s=1.0, max_attempts=2, reason="replica lost twice")
    assert failed == ["running"] and requeued == []
    assert a.get("running").state == FAILED and a.get("running").error == "replica lost twice"
    assert a.get("waiting").state == QUEUED


def test_cancel_is_immediate_when_queued_and_forwarded_when_owned(stores: list[PostgresJobStore]) -> None:
    a, b = stores
    a.create(record("free"))
    assert b.request_cancel("free") and a.get("free").state == CANCELLED
    a.create(record("owned"))
    assert [r.job_id for r in a.claim(1)] == ["owned"]
    a.update("owned", state=RUNNING, owned_by="replica-0")
    assert not b.request_cancel("owned")
    assert a.cancel_requests() == ["owned"] and b.cancel_requests() == []


def test_retention_and_quota_are_shared(stores: list[PostgresJobStore]) -> None:
    a, b = stores
    a.create(record("old", blob="d" * 64))
    a.add_blob("d" * 64, 100, "t1")
    b.add_blob("e" * 64, 50, "t1")
    assert a.usage() == b.usage() == 150
    a.update("old", state=SUCCEEDED, finished=time.time() - 10)
    results = [a.expire(time.time()), b.expire(time.time())]
    assert sorted(results, key=len) == [[], ["old"]]  # expired once, by one replica
    assert set(b.unreferenced_blobs(time.time() + 1)) == {"d" * 64, "e" * 64}
    a.forget_blob("d" * 64)
    assert b.usage() == 50


def test_database_outage_is_unavailable_and_recovers(postgres, stores: list[PostgresJobStore]) -> None:
    a, _ = stores
    a.create(record("j1"))
    postgres.stop()
    try:
        with pytest.raises(UnavailableError, match="job database unreachable"):
            a.get("j1")
        assert "unreachable" in (a.ping() or "")
    finally:
        postgres.start()
    assert a.ping() is None
    assert a.get("j1").job_id == "j1"


# -- blob stores ------------------------------------------------------------------------------------------------

def _put(store, data: bytes):
    return store.put_stream([data[i:i + 7] for i in range(0, len(data), 7)], size=len(data),
                            sha256=hashlib.sha256(data).hexdigest())


@pytest.fixture
def s3_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A bucket on a local moto S3 server; credentials and endpoint reach s3fs through the environment."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="blobs")
    yield "s3://blobs/onnxprune"
    server.stop()


@pytest.mark.parametrize("kind", ["shared-dir", "file-url", "s3"])
def test_shared_blob_stores_verify_deduplicate_and_refuse_bad_ids(kind: str, tmp_path: Path, request) -> None:
    location = {"shared-dir": str(tmp_path / "shared"), "file-url": f"file://{tmp_path / 'shared'}",
                "s3": request.getfixturevalue("s3_url") if kind == "s3" else ""}[kind]
    total = {"n": 0}
    replicas = [open_blob_store(location, cache_dir=tmp_path / f"cache{i}", quota_bytes=1000, max_upload_bytes=500,
                                shared=True, usage_source=lambda: total["n"]) for i in range(2)]
    a, b = replicas
    assert isinstance(a, FsspecBlobStore if kind == "s3" else DirBlobStore)
    data = b"model bytes " * 20
    info = _put(a, data)
    assert info.blob_id == hashlib.sha256(data).hexdigest() and info.size == len(data)
    assert b"".join(b.read(info.blob_id)) == data  # the other replica sees it
    assert b.local_path(info.blob_id).read_bytes() == data
    assert _put(b, data) == info and b.list_ids() == [info.blob_id]  # stored once
    with pytest.raises(BadInputError, match="sha256 mismatch"):
        a.put_stream([data], size=len(data), sha256="0" * 64)
    with pytest.raises(BadInputError, match="declared"):
        a.put_stream([data], size=len(data) + 1, sha256=info.blob_id)
    for bad in ("../" + "a" * 61, "A" * 64, "a" * 63, "/etc/passwd"):
        with pytest.raises(BadInputError, match="64 lower-case hex"):
            b.read(bad).__next__()
        with pytest.raises(BadInputError, match="64 lower-case hex"):
            b.local_path(bad)
    total["n"] = 900  # what all replicas have stored, as the job database counts it
    with pytest.raises(ResourceExhaustedError, match="store is full"):
        _put(b, b"x" * 200)
    result = tmp_path / "result.bin"
    result.write_bytes(b"pruned")
    stored = b.put_file(result)
    assert b"".join(a.read(stored.blob_id)) == b"pruned"
    a.delete(info.blob_id)
    with pytest.raises(NotFoundError):
        b"".join(a.read(info.blob_id))
    assert a.size(info.blob_id) is None


def test_object_store_copy_is_checked_against_its_id(s3_url: str, tmp_path: Path) -> None:
    store = FsspecBlobStore(s3_url, cache_dir=tmp_path / "c", quota_bytes=10_000, max_upload_bytes=10_000)
    info = _put(store, b"original")
    store.fs.pipe(store._key(info.blob_id), b"tampered")  # someone with bucket access changes the object
    fresh = FsspecBlobStore(s3_url, cache_dir=tmp_path / "c2", quota_bytes=10_000, max_upload_bytes=10_000)
    with pytest.raises(InvariantError, match="corrupted"):
        fresh.local_path(info.blob_id)
    assert not (tmp_path / "c2" / info.blob_id[:2] / info.blob_id).exists()
