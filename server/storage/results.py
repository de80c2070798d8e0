"""Where result images are kept: the interface every place of keeping them offers, and a folder that does.

A folder may be local or shared by replicas (NFS, a ReadWriteMany volume); S3-compatible object storage is the
other place (server/storage/s3.py). The rest of the server sees only `Results`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from .ids import is_request_id, is_result_file_name


class ResultWriteFailed(RuntimeError):
    """A request's images could not be kept (a full or read-only results folder; an object store that is down,
    answers errors, or stays slow past its timeouts and retries): none of its images is left behind. The message
    says why, briefly."""


class Results(Protocol):
    """Where result images are kept. Every method refuses (None, or ValueError for write) a request id that is not
    of the issued format and a file name the engine would not make, before it touches storage."""

    def write(self, request_id: str, images: Sequence[tuple[str, bytes]]) -> None:
        """Each image atomically (a reader sees all of it or none); ResultWriteFailed, with none of them left, if
        one cannot be written."""

    def read(self, request_id: str, file_name: str) -> bytes | None: ...

    def url(self, request_id: str, file_name: str, ttl_s: float) -> str | None:
        """A URL of the storage itself that clients may fetch for ttl_s, or None: the server serves the file."""

    def path(self, request_id: str, file_name: str) -> Path | None:
        """A local file the server can send, or None (none there, or not kept in a filesystem)."""

    def delete(self, request_id: str) -> None: ...


class FolderResults:
    """Result images in a folder, one sub-folder per request: local, or shared by replicas (NFS, RWX volume)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, request_id: str, images: Sequence[tuple[str, bytes]]) -> None:
        """Each file atomically (a reader sees all of it or none)."""
        if not is_request_id(request_id):
            raise ValueError("result folders are named by issued request ids only")
        if not all(is_result_file_name(name) for name, _ in images):
            raise ValueError("result file names must be image_<index>.<png|jpg|webp>")
        folder = self.root / request_id
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in images:
                tmp = folder / f".{name}.{os.getpid()}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, folder / name)
        except OSError as exc:  # a full disk (ENOSPC), a read-only or vanished folder, a quota
            shutil.rmtree(folder, ignore_errors=True)
            raise ResultWriteFailed(f"the results folder could not be written: {exc.strerror or exc}") from exc

    def path(self, request_id: str, file_name: str) -> Path | None:
        """The file of a stored image, or None. Only an id of the issued format and an engine-made file name are
        looked at, and the path must resolve inside that request's own folder (no links out)."""
        if not (is_request_id(request_id) and is_result_file_name(file_name)):
            return None
        folder = (self.root / request_id).resolve()
        path = (folder / file_name).resolve()
        if path.parent != folder or not folder.is_relative_to(self.root.resolve()) or not path.is_file():
            return None
        return path

    def read(self, request_id: str, file_name: str) -> bytes | None:
        path = self.path(request_id, file_name)
        return path.read_bytes() if path is not None else None

    def url(self, request_id: str, file_name: str, ttl_s: float) -> str | None:
        return None  # a folder has no URL of its own: the server signs and serves /results/...

    def delete(self, request_id: str) -> None:
        if is_request_id(request_id):
            shutil.rmtree(self.root / request_id, ignore_errors=True)
