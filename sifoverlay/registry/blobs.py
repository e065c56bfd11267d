"""Blob transfers in bounded-memory chunks. Uploads: a byte range of a file (layers
inside the SIF, the SIF itself) and a stream produced on the fly (converted tar layers).
Downloads: a response body written through the io seam and hashed on the way."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Final

from sifoverlay.errors import UsageError
from sifoverlay.fsio import FileIO

from .client import CHUNK_SIZE, BlobUpload, Progress, RegistryClient

log = logging.getLogger(__name__)

DOWNLOAD_CHUNK: Final = 4 << 20


@dataclass(frozen=True, slots=True)
class PushedBlob:
    digest: str
    size: int
    uploaded: bool  # False: the registry already had it (HEAD)


class ProgressTotal:
    """Adds up bytes of several blobs into one (done, total) callback."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0

    def add(self, count: int) -> None:
        self.done += count
        if self.progress is not None:
            self.progress(self.done, self.total)


def upload_range(client: RegistryClient, fd: int, offset: int, size: int, digest: str,
                 tally: ProgressTotal | None = None, *, chunk: int = CHUNK_SIZE) -> PushedBlob:
    """Upload [offset, offset+size) of `fd` as blob `digest`, unless the registry has it.
    The registry verifies the digest, so bytes that changed since it was computed fail."""
    if client.blob_exists(digest):
        log.debug("%s: blob %s already present", client.ref, digest)
        if tally is not None:
            tally.add(size)
        return PushedBlob(digest, size, False)
    upload = client.start_upload()
    done = 0
    try:
        while done < size:
            data = os.pread(fd, min(chunk, size - done), offset + done)
            if not data:
                raise client.fail(f"the image ended early while reading blob {digest} (file truncated?)")
            upload.write(data)
            done += len(data)
            if tally is not None:
                tally.add(len(data))
        upload.finish(digest)
    except Exception:
        upload.cancel()
        raise
    return PushedBlob(digest, size, True)


class StreamingBlob:
    """A writable sink: bytes are hashed, counted and PATCHed in chunks as they come;
    `close()` sends the last chunk and PUTs the digest computed on the way."""

    def __init__(self, client: RegistryClient, tally: ProgressTotal | None = None, *, chunk: int = CHUNK_SIZE) -> None:
        self._upload: BlobUpload = client.start_upload()
        self._buffer = bytearray()
        self._hash = hashlib.sha256()
        self._chunk = chunk
        self._tally = tally
        self.size = 0
        self.digest: str | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buffer += data
        self._hash.update(data)
        self.size += len(data)
        if len(self._buffer) >= self._chunk:
            self._flush_buffer()
        return len(data)

    def _flush_buffer(self) -> None:
        if self._buffer:
            self._upload.write(bytes(self._buffer))
            if self._tally is not None:
                self._tally.add(len(self._buffer))
            self._buffer.clear()

    def flush(self) -> None:  # file-like API: data goes out in whole chunks only
        pass

    def cancel(self) -> None:
        self._upload.cancel()

    def close(self) -> PushedBlob:
        self._flush_buffer()
        self.digest = "sha256:" + self._hash.hexdigest()
        self._upload.finish(self.digest)
        return PushedBlob(self.digest, self.size, True)


def output_directory(out: str) -> str:
    """The existing directory a pull writes `out` into (temp files go there too)."""
    if os.path.isdir(out):
        raise UsageError(out, "output is a directory")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise UsageError(out, "output directory does not exist")
    return directory


def receive(response: Any, fd: int, *, io: FileIO, tally: ProgressTotal | None = None) -> tuple[str, int]:
    """Write the streamed body of `response` (requests) into `fd` from offset 0, hashing
    it on the way; the response is closed. Returns ('sha256:<hex>', bytes written): the
    caller compares them with what the manifest promised."""
    hasher, written = hashlib.sha256(), 0
    try:
        for chunk in response.iter_content(chunk_size=DOWNLOAD_CHUNK):
            io.pwrite(fd, chunk, written)
            hasher.update(chunk)
            written += len(chunk)
            if tally is not None:
                tally.add(len(chunk))
    finally:
        response.close()
    return "sha256:" + hasher.hexdigest(), written
