"""The engine's caches of T5 outputs: in memory (`EmbeddingCache`), on disk (`DiskEmbeddingCache`), both in tiers.

A repeated prompt skips the text encoder, and with a disk cache even across restarts. T5-XXL is the biggest graph
(4.7B parameters); on a memory-constrained edge device, encoding a prompt seen before is the most avoidable cost
there is. `DiskEmbeddingCache` keeps (L, C) float32 states in a folder:

    folder/<sha256 of the model key>/<sha256 of (model key, length, text)>.npy

The model key (the text encoder graph's SHA-256 from the export's manifest) is in both the subfolder and each file
name, so a re-exported model never reads a stale embedding. File names are hashes and never the text itself: texts
are hostile, unbounded input ('/', '..', NUL, 100,000 characters). Entries are written atomically (a temp file in
the same folder, fsync, os.replace); on load the header is checked before any data is read, and an entry that is
truncated, garbage, or of the wrong shape or dtype is a miss and is removed. The folder is bounded in bytes by
least-recent use, recency being the file's mtime (touched on every hit), so the order survives a restart too.

`TieredEmbeddingCache` puts the in-memory `EmbeddingCache` in front of it with that cache's own interface
(`get((text, length))`, `put((text, length), value)`, `clear()`), so the engine can swap one for the other unchanged;
`open_text_cache` makes the one an engine's options ask for.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

# Part of every hash: a change to the file layout or to what is hashed bumps it, so old entries simply miss.
_FORMAT = b"pixart-t5-cache/1"
_HEX = re.compile(r"[0-9a-f]{64}")
_TEMP_PREFIX = ".tmp-"
# A temp file older than this at startup was left by a writer that crashed before os.replace; younger ones may
# belong to another process writing into the same folder right now.
_STALE_TEMP_S = 600.0


def _digest(*parts: bytes) -> str:
    # Each part is length-prefixed, so no two (model key, length, text) triples hash the same byte string.
    h = hashlib.sha256(_FORMAT)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _utf8(text: str) -> bytes:
    # surrogatepass: a Python str may hold lone surrogates (e.g. from a JSON "\ud800"), which strict UTF-8 refuses.
    return text.encode("utf-8", "surrogatepass")


def _read_entry(f: io.BufferedReader, length: int) -> np.ndarray | None:
    """The (length, C) float32 array in an open .npy file, or None when the file is anything else.

    The header is checked against the file's size before np.load reads data, so a corrupt header that claims a huge
    shape never makes numpy allocate for it.
    """
    size = os.fstat(f.fileno()).st_size
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        return None
    if fortran_order or dtype != np.dtype(np.float32) or len(shape) != 2 or shape[0] != length:
        return None
    if f.tell() + shape[0] * shape[1] * dtype.itemsize != size:
        return None
    f.seek(0)
    value = np.load(f, allow_pickle=False)
    if value.shape != shape or value.dtype != np.float32:
        return None
    return value


class DiskEmbeddingCache:
    """T5 outputs on disk, keyed by (model key, text, length), bounded in bytes by least-recent use.

    `bytes` and `len()` cover every entry in the folder, those of other model keys included: the bound is on the
    folder's disk use, and a replaced model's entries, never hit again, are the first to go. Several processes may
    share a folder (each reads the others' entries), but each one's count of bytes is its own, so the bound then
    holds per process, not for the sum.
    """

    def __init__(self, folder: str | Path, model_key: str, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.model_key = model_key
        self.max_bytes = max_bytes
        self.bytes = 0
        key = _utf8(model_key)
        self._key = key
        self.model_folder = self.folder / _digest(b"model", key)
        # Entry path -> file size, least recently used first. One lock around index and file operations alike:
        # an entry is a few MB, far cheaper than the T5 run it saves, and one lock keeps index and disk in step.
        self._index: OrderedDict[Path, int] = OrderedDict()
        self._lock = threading.Lock()
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.model_folder.mkdir(mode=0o700, exist_ok=True)
        with self._lock:
            self._scan()
            self._evict()

    def path(self, text: str, length: int) -> Path:
        """Where the entry for (text, length) under this model key lives (whether or not it exists)."""
        return self.model_folder / f"{_digest(b'entry', self._key, str(int(length)).encode(), _utf8(text))}.npy"

    def __len__(self) -> int:
        return len(self._index)

    def get(self, text: str, length: int) -> np.ndarray | None:
        """The stored (length, C) float32 states, read-only, or None; never raises for what is on disk."""
        path = self.path(text, length)
        with self._lock:
            try:
                with open(path, "rb") as f:
                    value = _read_entry(f, length)
                    size = os.fstat(f.fileno()).st_size
            except FileNotFoundError:
                self._forget(path)
                return None
            except Exception as exc:  # any bytes can be on disk and numpy fails on them in many ways: all are misses
                log.warning("text cache entry %s unreadable (%s: %s); removed", path.name, type(exc).__name__, exc)
                value, size = None, 0
            if value is None:
                self._remove(path)
                return None
            with suppress(OSError):
                os.utime(path)  # recency that outlives this process: the next start orders entries by mtime
            if path not in self._index:  # written by another process sharing the folder
                self._index[path] = size
                self.bytes += size
            self._index.move_to_end(path)
            self._evict()
        value.flags.writeable = False
        return value

    def put(self, text: str, length: int, value: np.ndarray) -> None:
        """Store (length, C) states for (text, length). A value bigger than max_bytes is not stored.

        Failing to write (disk full, read-only folder) is logged, not raised: the cache only saves work.
        """
        value = np.asarray(value)
        if value.ndim != 2 or value.shape[0] != length:
            raise ValueError(f"expected ({length}, C) text states, got shape {value.shape}")
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(value, dtype=np.float32), allow_pickle=False)
        data = buffer.getbuffer()
        if len(data) > self.max_bytes:
            return
        path = self.path(text, length)
        with self._lock:
            if path in self._index:
                try:
                    os.utime(path)
                    self._index.move_to_end(path)
                    return
                except FileNotFoundError:  # removed behind our back: write it again
                    self._forget(path)
            if not self._write(path, data):
                return
            self._index[path] = len(data)
            self.bytes += len(data)
            self._evict()

    # ---- under the lock --------------------------------------------------------------------------------------

    def _write(self, path: Path, data: memoryview) -> bool:
        temp: str | None = None
        try:
            # Recreated if an operator emptied the cache while the engine ran.
            self.model_folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".npy", dir=self.model_folder)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                # Without fsync a power cut after os.replace can leave a full-size file of zeros, which passes
                # every check on load and would be returned as states.
                os.fsync(f.fileno())
            os.replace(temp, path)
            temp = None
            return True
        except OSError as exc:
            log.warning("text cache could not write %s (%s)", path.name, exc)
            return False
        finally:
            if temp is not None:
                with suppress(OSError):
                    os.unlink(temp)

    def _scan(self) -> None:
        """Index the folder's entries, oldest mtime first; remove temp files crashed writers left behind."""
        found: list[tuple[int, str, Path, int]] = []
        now = time.time()
        with suppress(OSError), os.scandir(self.folder) as models:
            for model in models:
                if not (_HEX.fullmatch(model.name) and model.is_dir(follow_symlinks=False)):
                    continue
                with suppress(OSError), os.scandir(model.path) as entries:
                    for entry in entries:
                        with suppress(OSError):
                            if not entry.is_file(follow_symlinks=False):
                                continue
                            stat = entry.stat(follow_symlinks=False)
                            if entry.name.startswith(_TEMP_PREFIX):
                                if now - stat.st_mtime > _STALE_TEMP_S:
                                    os.unlink(entry.path)
                            elif entry.name.endswith(".npy") and _HEX.fullmatch(entry.name[:-4]):
                                found.append((stat.st_mtime_ns, entry.path, Path(entry.path), stat.st_size))
        for _, _, path, size in sorted(found):
            self._index[path] = size
            self.bytes += size

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._index:
            path, _ = next(iter(self._index.items()))
            self._remove(path)

    def _remove(self, path: Path) -> None:
        self._forget(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("text cache could not remove %s (%s)", path.name, exc)

    def _forget(self, path: Path) -> None:
        size = self._index.pop(path, None)
        if size is not None:
            self.bytes -= size


class EmbeddingCache:
    """Least-recently-used T5 outputs, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: tuple[str, int], value: np.ndarray) -> None:
        if key in self.entries or value.nbytes > self.max_bytes:
            return
        value = value.copy()
        value.flags.writeable = False
        self.entries[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


class KeyedEmbeddingCache(Protocol):
    """The interface of the in-memory `EmbeddingCache`, which the engine reads and writes its T5 outputs through."""

    def get(self, key: tuple[str, int]) -> np.ndarray | None: ...

    def put(self, key: tuple[str, int], value: np.ndarray) -> None: ...

    def clear(self) -> None: ...


class TieredEmbeddingCache:
    """Memory first, then disk, behind the in-memory cache's own `get(key)` / `put(key, value)`.

    A disk hit is promoted into memory, so a prompt repeated within a run reads the disk once. `put` writes through
    to both, so what is in memory also survives a restart.
    """

    def __init__(self, memory: KeyedEmbeddingCache, disk: DiskEmbeddingCache) -> None:
        self.memory, self.disk = memory, disk
        # The in-memory LRU is not thread-safe by itself (an OrderedDict reordered on every get).
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        with self._lock:
            value = self.memory.get(key)
        if value is not None:
            return value
        value = self.disk.get(*key)
        if value is not None:
            with self._lock:
                self.memory.put(key, value)
        return value

    def put(self, key: tuple[str, int], value: np.ndarray) -> None:
        with self._lock:
            self.memory.put(key, value)
        self.disk.put(*key, value)

    def clear(self) -> None:
        """Empty the memory tier; the disk tier is kept, being there to outlive the process."""
        with self._lock:
            self.memory.clear()


def open_text_cache(
    memory_bytes: int, folder: str | Path | None, text_encoder: Path, hashes: Mapping[str, Mapping[str, str]],
    disk_bytes: int,
) -> KeyedEmbeddingCache:
    """The in-memory cache, and with a `folder` the disk cache behind it, keyed by the `text_encoder` graph's weights:
    their SHA-256 from the manifest's `hashes`, or their name, size and mtime where it has none."""
    memory = EmbeddingCache(memory_bytes)
    if folder is None:
        return memory
    entry = hashes.get(text_encoder.name + ".data") or hashes.get(text_encoder.name)
    key = entry["sha256"] if entry else _file_identity(text_encoder)
    return TieredEmbeddingCache(memory, DiskEmbeddingCache(folder, key, disk_bytes))


def _file_identity(path: Path) -> str:
    """Stands in for a hash the manifest lacks: name, size and modification time of the graph's weights."""
    data = path.with_name(path.name + ".data")
    target = data if data.exists() else path
    st = target.stat()
    return f"{target.name}-{st.st_size}-{st.st_mtime_ns}"
