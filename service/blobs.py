"""Content-addressed blob storage for uploaded models and job results.

A blob's id is the sha256 of its bytes, so identical uploads are stored once and a downloaded file can be
verified against its id. :class:`BlobStore` is the interface; :class:`DirBlobStore` keeps blobs in
``ROOT/ab/abcdef…`` files (a local folder, or one on shared storage that several replicas mount) and
:class:`FsspecBlobStore` keeps the same layout under any fsspec URL (``s3://bucket/prefix`` for S3-compatible object
storage). Both stream everything through fixed size buffers, so no upload or download is ever held in memory whole,
and both take blob ids only through :func:`check_blob_id` and uploads only through :func:`receive_upload`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from onnxprune.errors import BadInputError
from onnxprune.io.scan import file_sha256
from onnxprune.service.errors import NotFoundError, ResourceExhaustedError

CHUNK_SIZE = 1 << 20  # the wire limit per message, 1 MiB
_BLOB_ID = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class BlobInfo:
    blob_id: str
    size: int


class BlobStore(Protocol):
    """Where uploads and results live; ids are sha256 hex digests."""

    def put_stream(self, chunks: Iterable[bytes], *, size: int, sha256: str) -> BlobInfo: ...

    def put_file(self, path: Path) -> BlobInfo: ...

    def read(self, blob_id: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]: ...

    def size(self, blob_id: str) -> int | None: ...

    def materialize(self, blob_id: str, dest: Path) -> None: ...

    def delete(self, blob_id: str) -> None: ...

    def local_path(self, blob_id: str) -> Path: ...

    def usage(self) -> int: ...

    def list_ids(self) -> list[str]: ...


def check_blob_id(blob_id: str) -> str:
    """Blob ids reach file paths; only accept the exact sha256 hex form.

    Raises:
        BadInputError: for anything else.
    """
    if not _BLOB_ID.match(blob_id or ""):
        raise BadInputError(f"blob id must be 64 lower-case hex characters, got {blob_id[:80]!r}", field="blob_id")
    return blob_id


UsageFn = Callable[[], int]
_STALE_TMP_S = 24 * 3600.0  # another replica's partial upload older than this is a leftover of a crash


def receive_upload(chunks: Iterable[bytes], *, size: int, sha256: str, max_upload_bytes: int, dest: Path) -> None:
    """Write an upload to ``dest``, verifying the declared size and sha256 as the bytes arrive.

    Raises:
        BadInputError: a declared size over the upload limit, more or fewer bytes than declared, a chunk
            over 1 MiB, or a sha256 mismatch (``field`` names which).
    """
    if size < 0 or size > max_upload_bytes:
        raise BadInputError(f"upload of {size} bytes exceeds the limit of {max_upload_bytes}", field="size")
    digest = hashlib.sha256()
    received = 0
    with open(dest, "wb") as f:
        for chunk in chunks:
            if len(chunk) > CHUNK_SIZE:
                raise BadInputError(f"chunk of {len(chunk)} bytes exceeds 1 MiB", field="chunk")
            received += len(chunk)
            if received > size:
                raise BadInputError(f"upload sent more than the declared {size} bytes", field="size")
            digest.update(chunk)
            f.write(chunk)
    if received != size:
        raise BadInputError(f"upload ended after {received} of the declared {size} bytes", field="size")
    if digest.hexdigest() != sha256:
        raise BadInputError(
            f"sha256 mismatch: declared {sha256}, received bytes hash to {digest.hexdigest()}", field="sha256"
        )


def put_upload(chunks: Iterable[bytes], *, size: int, sha256: str, max_upload_bytes: int, quota: _Quota,
               tmp_dir: Path, commit: Callable[[Path, str], BlobInfo]) -> BlobInfo:
    """An upload as every blob store takes it: id and size checked, quota reserved, bytes verified into a
    temporary file under ``tmp_dir`` (:func:`receive_upload`), then ``commit(tmp, sha256)`` stores it.

    Raises:
        BadInputError: see :func:`receive_upload`.
        ResourceExhaustedError: the upload would cross the store's quota.
    """
    sha256 = (sha256 or "").lower()
    check_blob_id(sha256)
    if size < 0 or size > max_upload_bytes:
        raise BadInputError(f"upload of {size} bytes exceeds the limit of {max_upload_bytes}", field="size")
    quota.reserve(size)
    tmp = tmp_dir / uuid.uuid4().hex
    try:
        receive_upload(chunks, size=size, sha256=sha256, max_upload_bytes=max_upload_bytes, dest=tmp)
        return commit(tmp, sha256)
    finally:
        tmp.unlink(missing_ok=True)
        quota.release(size)


class _Quota:
    """Bytes stored plus bytes reserved by uploads in flight, against a limit.

    ``usage_source`` (replicas sharing one store pass the job database's total) replaces the local count of
    stored bytes, which only sees this process's own writes.
    """

    def __init__(self, limit: int, stored: Callable[[], int], usage_source: UsageFn | None) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._reserved = 0
        self._usage_source = usage_source
        self._used = 0 if usage_source else stored()

    def _stored(self) -> int:
        return self._usage_source() if self._usage_source else self._used

    def reserve(self, size: int) -> None:
        stored = self._stored()
        with self._lock:
            if stored + self._reserved + size > self.limit:
                raise ResourceExhaustedError(
                    f"store is full: {stored + self._reserved} of {self.limit} bytes used, "
                    f"{size} more requested; wait for results to expire or raise the quota"
                )
            self._reserved += size

    def release(self, size: int) -> None:
        with self._lock:
            self._reserved -= size

    def add(self, size: int) -> None:
        with self._lock:
            self._used += size

    def usage(self) -> int:
        stored = self._stored()
        with self._lock:
            return stored + self._reserved


def _remove_stale(folder: Path, older_than: float) -> None:
    for entry in folder.iterdir():
        try:
            if entry.stat().st_mtime >= older_than:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        except FileNotFoundError:
            continue


class DirBlobStore:
    """Blobs as files in a directory, with a byte quota enforced before any byte is written.

    ``quota_bytes`` bounds the blobs on disk plus space reserved by uploads in flight; an upload that would
    cross it is refused up front with RESOURCE_EXHAUSTED. ``max_upload_bytes`` bounds one upload.

    ``shared=True`` (a folder several replicas mount): each process writes partial uploads into its own
    ``tmp/<random id>`` folder and removes only leftovers older than a day; a blob appears by an atomic rename,
    so a replica never reads half a file. ``usage_source`` then gives the stored bytes of all replicas.
    """

    def __init__(self, root: Path, *, quota_bytes: int, max_upload_bytes: int, shared: bool = False,
                 usage_source: UsageFn | None = None) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        if shared:
            _remove_stale(self._tmp, time.time() - _STALE_TMP_S)
            self._tmp = self._tmp / uuid.uuid4().hex
            self._tmp.mkdir()
        else:
            for stale in self._tmp.iterdir():  # partial uploads of a previous run
                if stale.is_file():
                    stale.unlink(missing_ok=True)
        self.quota_bytes = quota_bytes
        self.max_upload_bytes = max_upload_bytes
        self._lock = threading.Lock()
        self._quota = _Quota(quota_bytes, lambda: sum(p.stat().st_size for p in self._blob_files()), usage_source)

    def _blob_files(self) -> Iterator[Path]:
        for sub in self.root.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                yield from (p for p in sub.iterdir() if _BLOB_ID.match(p.name))

    def _path(self, blob_id: str) -> Path:
        check_blob_id(blob_id)
        return self.root / blob_id[:2] / blob_id

    def _commit(self, tmp: Path, blob_id: str) -> BlobInfo:
        final = self._path(blob_id)
        final.parent.mkdir(exist_ok=True)
        size = tmp.stat().st_size
        with self._lock:
            if final.exists():
                tmp.unlink()
            else:
                os.replace(tmp, final)
                self._quota.add(size)
        return BlobInfo(blob_id, size)

    def put_stream(self, chunks: Iterable[bytes], *, size: int, sha256: str) -> BlobInfo:
        """Store an upload, verifying the declared size and sha256 as the bytes arrive (:func:`put_upload`)."""
        return put_upload(chunks, size=size, sha256=sha256, max_upload_bytes=self.max_upload_bytes,
                          quota=self._quota, tmp_dir=self._tmp, commit=self._commit)

    def put_file(self, path: Path) -> BlobInfo:
        """Move a local file (a job result) into the store; results are not refused for quota, uploads are."""
        blob_id = file_sha256(path)
        tmp = self._tmp / uuid.uuid4().hex
        try:
            shutil.move(path, tmp)
            return self._commit(tmp, blob_id)
        finally:
            tmp.unlink(missing_ok=True)

    def read(self, blob_id: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the blob in chunks.

        Raises:
            NotFoundError: no such blob.
        """
        try:
            f = open(self._path(blob_id), "rb")
        except FileNotFoundError as e:
            raise NotFoundError(f"blob {blob_id} not found") from e
        with f:
            while block := f.read(chunk_size):
                yield block

    def size(self, blob_id: str) -> int | None:
        try:
            return self._path(blob_id).stat().st_size
        except FileNotFoundError:
            return None

    def materialize(self, blob_id: str, dest: Path) -> None:
        """Copy the blob to ``dest`` for a job (``copyfile`` uses sendfile: no bytes pass through Python).

        Not a hard link: onnx refuses external data files with several links (a known hardlink attack), and a
        job must never be able to modify the stored blob. Not a symlink: loaders resolve it out of the job's
        folder and refuse it.

        Raises:
            NotFoundError: no such blob.
        """
        src = self._path(blob_id)
        if not src.exists():
            raise NotFoundError(f"blob {blob_id} not found")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def local_path(self, blob_id: str) -> Path:
        """A readable local file with the blob's bytes.

        Raises:
            NotFoundError: no such blob.
        """
        path = self._path(blob_id)
        if not path.exists():
            raise NotFoundError(f"blob {blob_id} not found")
        return path

    def delete(self, blob_id: str) -> None:
        path = self._path(blob_id)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        self._quota.add(-size)

    def usage(self) -> int:
        return self._quota.usage()

    def list_ids(self) -> list[str]:
        return [p.name for p in self._blob_files()]


class FsspecBlobStore:
    """Blobs under an fsspec URL (``s3://bucket/prefix``, ``gs://…``, ``file:///…``), same ``ab/<id>`` layout.

    Uploads are verified into a local file first (:func:`receive_upload`), then copied up; a blob appears under
    its final key only whole (object stores write whole objects; other filesystems get a temporary key and a
    move). Local copies the server needs (model checks, job inputs) are fetched into ``cache_dir`` and their
    sha256 checked against the id before use, so a corrupted object is never handed to a job.

    Args:
        url: where the blobs live; credentials come from fsspec's usual sources (environment, config files) or
            ``storage_options``.
        cache_dir: local scratch for uploads in flight and fetched copies.
        usage_source: the stored bytes of all replicas (the job database's total); without it, a listing.
    """

    _WHOLE_OBJECT_WRITES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "memory"})

    def __init__(self, url: str, *, cache_dir: Path, quota_bytes: int, max_upload_bytes: int,
                 usage_source: UsageFn | None = None, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self._whole_writes = bool(protocols & self._WHOLE_OBJECT_WRITES)
        self.cache = Path(cache_dir)
        self._tmp = self.cache / "tmp"
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        self.quota_bytes = quota_bytes
        self.max_upload_bytes = max_upload_bytes
        self._quota = _Quota(quota_bytes, lambda: sum(self._listing().values()), usage_source)

    def _key(self, blob_id: str) -> str:
        check_blob_id(blob_id)
        return f"{self.root}/{blob_id[:2]}/{blob_id}"

    def _cached(self, blob_id: str) -> Path:
        check_blob_id(blob_id)
        return self.cache / blob_id[:2] / blob_id

    def _listing(self) -> dict[str, int]:
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for key, info in found.items():
            name = key.rstrip("/").rsplit("/", 2)
            if len(name) == 3 and len(name[1]) == 2 and _BLOB_ID.match(name[2]) and name[2].startswith(name[1]):
                out[name[2]] = int(info.get("size") or 0)
        return out

    def _upload(self, local: Path, blob_id: str) -> BlobInfo:
        key = self._key(blob_id)
        size = local.stat().st_size
        if self.fs.exists(key):
            return BlobInfo(blob_id, size)
        if self._whole_writes:
            self.fs.put_file(str(local), key)
        else:
            partial = f"{self.root}/tmp/{uuid.uuid4().hex}"
            self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)
            self.fs.makedirs(f"{self.root}/{blob_id[:2]}", exist_ok=True)
            self.fs.put_file(str(local), partial)
            self.fs.mv(partial, key)
        self._quota.add(size)
        return BlobInfo(blob_id, size)

    def _keep(self, local: Path, blob_id: str) -> None:
        cached = self._cached(blob_id)
        cached.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, cached)

    def _commit(self, local: Path, blob_id: str) -> BlobInfo:
        """Upload ``local`` under ``blob_id`` and keep it in the cache."""
        info = self._upload(local, blob_id)
        self._keep(local, blob_id)
        return info

    def put_stream(self, chunks: Iterable[bytes], *, size: int, sha256: str) -> BlobInfo:
        """Store an upload, verifying the declared size and sha256 as the bytes arrive (:func:`put_upload`)."""
        return put_upload(chunks, size=size, sha256=sha256, max_upload_bytes=self.max_upload_bytes,
                          quota=self._quota, tmp_dir=self._tmp, commit=self._commit)

    def put_file(self, path: Path) -> BlobInfo:
        """Copy a local file (a job result) up and keep it in the cache; results are not refused for quota."""
        return self._commit(Path(path), file_sha256(path))

    def read(self, blob_id: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the blob in chunks (from the cache when it holds a checked copy).

        Raises:
            NotFoundError: no such blob.
        """
        cached = self._cached(blob_id)
        try:
            f = open(cached, "rb") if cached.exists() else self.fs.open(self._key(blob_id), "rb")
        except FileNotFoundError as e:
            raise NotFoundError(f"blob {blob_id} not found") from e
        with f:
            while block := f.read(chunk_size):
                yield block

    def size(self, blob_id: str) -> int | None:
        try:
            return int(self.fs.size(self._key(blob_id)))
        except FileNotFoundError:
            return None

    def local_path(self, blob_id: str) -> Path:
        """A checked local copy of the blob, fetched into the cache on first use.

        Raises:
            NotFoundError: no such blob.
            InvariantError: the stored bytes do not hash to the id (corrupted or tampered object).
        """
        cached = self._cached(blob_id)
        if cached.exists():
            return cached
        tmp = self._tmp / uuid.uuid4().hex
        try:
            try:
                self.fs.get_file(self._key(blob_id), str(tmp))
            except FileNotFoundError as e:
                raise NotFoundError(f"blob {blob_id} not found") from e
            actual = file_sha256(tmp)
            if actual != blob_id:
                from onnxprune.errors import InvariantError

                raise InvariantError(f"blob {blob_id} in {self.url} is corrupted: its bytes hash to {actual}")
            self._keep(tmp, blob_id)
        finally:
            tmp.unlink(missing_ok=True)
        return cached

    def materialize(self, blob_id: str, dest: Path) -> None:
        """Copy the (checked) blob to ``dest`` for a job; never a link, as in :meth:`DirBlobStore.materialize`.

        Raises:
            NotFoundError: no such blob.
        """
        src = self.local_path(blob_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def delete(self, blob_id: str) -> None:
        self._cached(blob_id).unlink(missing_ok=True)
        try:
            size = int(self.fs.size(self._key(blob_id)))
            self.fs.rm(self._key(blob_id))
        except FileNotFoundError:
            return
        self._quota.add(-size)

    def usage(self) -> int:
        return self._quota.usage()

    def list_ids(self) -> list[str]:
        return sorted(self._listing())


def open_blob_store(location: str | Path, *, cache_dir: Path, quota_bytes: int, max_upload_bytes: int,
                    shared: bool = False, usage_source: UsageFn | None = None) -> BlobStore:
    """``--blob-dir``: a folder (local, or shared storage when ``shared``) or an fsspec URL such as ``s3://b/p``.

    ``file:///path`` is the folder ``/path``. Remote URLs need the filesystem's fsspec package (``s3fs`` for S3).
    """
    text = str(location)
    if "://" not in text or text.startswith("file://"):
        folder = Path(text.removeprefix("file://"))
        return DirBlobStore(folder, quota_bytes=quota_bytes, max_upload_bytes=max_upload_bytes, shared=shared,
                            usage_source=usage_source)
    return FsspecBlobStore(text, cache_dir=cache_dir, quota_bytes=quota_bytes, max_upload_bytes=max_upload_bytes,
                           usage_source=usage_source)
