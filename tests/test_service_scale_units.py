"""Scale-out options without a cluster: ``serve --help`` documents every option, the options reach the server's
configuration, the embedded default stays (local processes, SQLite, a blob folder), bad URLs name the option."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from onnxprune.cli import build_parser
from onnxprune.errors import BadInputError
from onnxprune.service.blobs import DirBlobStore, FsspecBlobStore, open_blob_store
from onnxprune.service.executor import LocalProcessExecutor
from onnxprune.service.server import config_from_args, create_server, open_job_store
from onnxprune.service.store import SqliteJobStore


def serve_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["serve"]


def test_serve_help_documents_every_option() -> None:
    serve = serve_parser()
    undocumented = [a.option_strings for a in serve._actions if a.option_strings and not a.help]
    assert undocumented == []
    text = serve.format_help()
    for option in ("--executor", "--ray-address", "--ray-cpus-per-job", "--ray-jobs-per-worker", "--ray-max-retries",
                   "--store-url",
                   "--blob-dir", "--heartbeat", "--replica-timeout", "--max-attempts"):
        assert re.search(rf"^\s+{option}\b", text, re.M), option


def test_scale_out_options_reach_the_config() -> None:
    args = serve_parser().parse_args(["--executor", "ray", "--ray-address", "10.0.0.1:6379", "--ray-cpus-per-job",
                                      "2", "--ray-max-retries", "1", "--ray-jobs-per-worker", "8",
                                      "--store-url", "postgresql://u@db/x",
                                      "--blob-dir", "s3://bucket/blobs", "--heartbeat", "1", "--replica-timeout",
                                      "9", "--max-attempts", "3"])
    config = config_from_args(args)
    assert (config.executor, config.ray_address, config.ray_cpus_per_job, config.ray_max_retries) == \
        ("ray", "10.0.0.1:6379", 2.0, 1)
    assert config.ray_jobs_per_worker == 8
    with pytest.raises(BadInputError, match="--ray-jobs-per-worker must be > 0"):
        config_from_args(serve_parser().parse_args(["--ray-jobs-per-worker", "0"]))
    assert (config.store_url, config.blob_dir) == ("postgresql://u@db/x", "s3://bucket/blobs")
    assert (config.heartbeat_s, config.replica_timeout_s, config.max_attempts) == (1.0, 9.0, 3)
    with pytest.raises(BadInputError, match="--ray-max-retries must be >= 0"):
        config_from_args(serve_parser().parse_args(["--ray-max-retries", "-1"]))
    with pytest.raises(BadInputError, match="--max-attempts must be > 0"):
        config_from_args(serve_parser().parse_args(["--max-attempts", "0"]))


def test_the_default_stays_embedded(tmp_path: Path) -> None:
    config = config_from_args(serve_parser().parse_args([]))
    assert (config.executor, config.store_url, config.blob_dir) == ("local", None, None)
    server, _ = create_server("127.0.0.1:0", tmp_path / "store", config)
    try:
        manager = server.manager
        assert isinstance(manager._store, SqliteJobStore) and manager._store.path == tmp_path / "store" / "jobs.sqlite"
        assert isinstance(manager._blobs, DirBlobStore) and manager._blobs.root == tmp_path / "store" / "blobs"
        assert isinstance(manager._executor, LocalProcessExecutor)
    finally:
        server.start()
        server.stop(grace=1)


def test_store_and_blob_locations(tmp_path: Path) -> None:
    store = open_job_store(f"sqlite:///{tmp_path / 'other.sqlite'}", tmp_path, "r1")
    assert isinstance(store, SqliteJobStore) and store.path == tmp_path / "other.sqlite"
    store.close()
    with pytest.raises(BadInputError, match="--store-url must be sqlite:///PATH or postgresql://") as info:
        open_job_store("mysql://db/x", tmp_path, "r1")
    assert info.value.field == "store_url"
    folder = open_blob_store(f"file://{tmp_path / 'b'}", cache_dir=tmp_path / "c", quota_bytes=10,
                             max_upload_bytes=10)
    assert isinstance(folder, DirBlobStore) and folder.root == tmp_path / "b"
    remote = open_blob_store("memory://onnxprune-test/blobs", cache_dir=tmp_path / "c", quota_bytes=100,
                             max_upload_bytes=100)
    assert isinstance(remote, FsspecBlobStore) and remote.list_ids() == []


def test_gpu_check_reports_unusable_cuda_as_one_json_error() -> None:
    import json
    import subprocess

    from onnxprune.runtime.device import probe_cuda

    if probe_cuda().cuda_usable:
        pytest.skip("CUDA is usable here: benchmarks/gpu_check.sh runs the real check instead")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([str(repo / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["ok"] is False and summary["error"].startswith("CUDA execution provider is not usable: ")
