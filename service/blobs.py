"""Content-addressed blob storage for uploaded models and job results.

A blob's id is the sha256 of its bytes, so identical uploads are stored once and a downloaded file can be
verified against its id. :class:`BlobStore` is the interface (so shared object storage can replace the
directory later); :class:`DirBlobStore` keeps blobs in ``ROOT/ab/abcdef…`` files and streams everything through fixed
size buffers, so no upload or download is ever held in memory whole.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from onnxprune.errors import BadInputError
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


class DirBlobStore:
    """Blobs as files in a directory, with a byte quota enforced before any byte is written.

    ``quota_bytes`` bounds the blobs on disk plus space reserved by uploads in flight; an upload that would
    cross it is refused up front with RESOURCE_EXHAUSTED. ``max_upload_bytes`` bounds one upload.
    """

    def __init__(self, root: Path, *, quota_bytes: int, max_upload_bytes: int) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        for stale in self._tmp.iterdir():  # partial uploads of a previous run
            stale.unlink(missing_ok=True)
        self.quota_bytes = quota_bytes
        self.max_upload_bytes = max_upload_bytes
        self._lock = threading.Lock()
        self._reserved = 0
        self._used = sum(p.stat().st_size for p in self._blob_files())

    def _blob_files(self) -> Iterator[Path]:
        for sub in self.root.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                yield from (p for p in sub.iterdir() if _BLOB_ID.match(p.name))

    def _path(self, blob_id: str) -> Path:
        check_blob_id(blob_id)
        return self.root / blob_id[:2] / blob_id

    def _reserve(self, size: int) -> None:
        with self._lock:
            if self._used + self._reserved + size > self.quota_bytes:
                raise ResourceExhaustedError(
                    f"store is full: {self._used + self._reserved} of {self.quota_bytes} bytes used, "
                    f"{size} more requested; wait for results to expire or raise the quota"
                )
            self._reserved += size

    def _release(self, size: int) -> None:
        with self._lock:
            self._reserved -= size

    def _commit(self, tmp: Path, blob_id: str) -> BlobInfo:
        final = self._path(blob_id)
        final.parent.mkdir(exist_ok=True)
        size = tmp.stat().st_size
        with self._lock:
            if final.exists():
                tmp.unlink()
            else:
                os.replace(tmp, final)
                self._used += size
        return BlobInfo(blob_id, size)

    def put_stream(self, chunks: Iterable[bytes], *, size: int, sha256: str) -> BlobInfo:
        """Store an upload, verifying the declared size and sha256 as the bytes arrive.

        Raises:
            BadInputError: a declared size over the upload limit, more or fewer bytes than declared, a chunk
                over 1 MiB, or a sha256 mismatch (``field`` names which).
            ResourceExhaustedError: the upload would cross the store's quota.
        """
        sha256 = (sha256 or "").lower()
        check_blob_id(sha256)
        if size < 0 or size > self.max_upload_bytes:
            raise BadInputError(f"upload of {size} bytes exceeds the limit of {self.max_upload_bytes}", field="size")
        self._reserve(size)
        tmp = self._tmp / uuid.uuid4().hex
        try:
            digest = hashlib.sha256()
            received = 0
            with open(tmp, "wb") as f:
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
            return self._commit(tmp, sha256)
        finally:
            tmp.unlink(missing_ok=True)
            self._release(size)

    def put_file(self, path: Path) -> BlobInfo:
        """Move a local file (a job result) into the store; results are not refused for quota, uploads are."""
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(CHUNK_SIZE):
                digest.update(block)
        tmp = self._tmp / uuid.uuid4().hex
        try:
            shutil.move(path, tmp)
            return self._commit(tmp, digest.hexdigest())
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
        """A readable local file with the blob's bytes (an object-store backend would fetch to a cache).

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
        with self._lock:
            self._used -= size

    def usage(self) -> int:
        with self._lock:
            return self._used + self._reserved

    def list_ids(self) -> list[str]:
        return [p.name for p in self._blob_files()]
