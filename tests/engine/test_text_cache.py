"""The on-disk T5 cache: restarts, model keys, hostile texts, LRU bounds, corrupt entries, atomic writes."""

from __future__ import annotations

import io
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from engine.text_cache import DiskEmbeddingCache, TieredEmbeddingCache

KEY = "a" * 64
C = 64  # small channel count: entries of 4 x 64 float32 = 1 KiB of data each


def states(length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((length, C)).astype(np.float32)


def entry_size(length: int) -> int:
    """What one (length, C) entry takes on disk (data and .npy header)."""
    buffer = io.BytesIO()
    np.save(buffer, states(length), allow_pickle=False)
    return len(buffer.getvalue())


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def only_entry(folder: Path) -> Path:
    (path,) = files(folder)
    return path


def test_survives_a_restart_bit_exactly(tmp_path):
    value = states(8)
    DiskEmbeddingCache(tmp_path / "c", KEY, 2**20).put("a cat", 8, value)
    again = DiskEmbeddingCache(tmp_path / "c", KEY, 2**20)
    got = again.get("a cat", 8)
    assert got is not None and got.dtype == np.float32 and got.shape == (8, C)
    assert got.tobytes() == value.tobytes()
    assert len(again) == 1 and again.bytes == only_entry(tmp_path / "c").stat().st_size
    with pytest.raises(ValueError):
        got[0, 0] = 1.0  # shared with the in-memory cache: must not be mutable


def test_keyed_by_model_key_and_length(tmp_path):
    cache = DiskEmbeddingCache(tmp_path, KEY, 2**20)
    cache.put("a cat", 8, states(8))
    assert DiskEmbeddingCache(tmp_path, "b" * 64, 2**20).get("a cat", 8) is None
    assert cache.get("a cat", 16) is None
    assert cache.get("a cat", 8) is not None
    # the model key is in the subfolder as well as in the name: another model's entry lands elsewhere
    other = DiskEmbeddingCache(tmp_path, "b" * 64, 2**20)
    other.put("a cat", 8, states(8, seed=1))
    mine, theirs = cache.path("a cat", 8), other.path("a cat", 8)
    assert mine.parent != theirs.parent and mine.name != theirs.name
    assert cache.get("a cat", 8).tobytes() == states(8).tobytes()


@pytest.mark.parametrize("text", [
    "x" * 100_000, "a/b", "../../../etc/passwd", "..", "/", "nul\0byte", "\0", "", "lone \ud800 surrogate",
    "C:\\Windows\\system32", "émoji 🐱",
])
def test_hostile_texts_round_trip_and_never_name_a_file(tmp_path, text):
    folder = tmp_path / "cache"
    cache = DiskEmbeddingCache(folder, KEY, 2**20)
    cache.put(text, 4, states(4))
    assert DiskEmbeddingCache(folder, KEY, 2**20).get(text, 4).tobytes() == states(4).tobytes()
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # nothing written outside the folder
    for path in folder.rglob("*"):
        assert re.fullmatch(r"[0-9a-f]{64}(\.npy)?", path.name), path.name
    entry = only_entry(folder)
    if len(text) >= 3:
        assert text.encode("utf-8", "surrogatepass") not in entry.read_bytes()


def test_eviction_keeps_the_bound_and_drops_the_least_recently_used(tmp_path):
    size = entry_size(4)
    cache = DiskEmbeddingCache(tmp_path, KEY, 3 * size + size // 2)
    for n, text in enumerate("abc"):
        cache.put(text, 4, states(4, n))
    assert cache.get("a", 4) is not None  # touch "a": "b" is now the oldest
    cache.put("d", 4, states(4, 3))
    assert cache.get("b", 4) is None
    assert [cache.get(t, 4) is not None for t in "acd"] == [True, True, True]
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    assert cache.bytes == sum(p.stat().st_size for p in files(tmp_path))


def test_recency_survives_a_restart(tmp_path):
    size = entry_size(4)
    cache = DiskEmbeddingCache(tmp_path, KEY, 3 * size + size // 2)
    for n, text in enumerate("abc"):
        cache.put(text, 4, states(4, n))
        os.utime(cache.path(text, 4), (1000 * (n + 1), 1000 * (n + 1)))  # a, b, c: oldest to newest
    assert DiskEmbeddingCache(tmp_path, KEY, cache.max_bytes).get("a", 4) is not None  # a hit touches the mtime
    restarted = DiskEmbeddingCache(tmp_path, KEY, cache.max_bytes)
    restarted.put("d", 4, states(4, 3))
    assert restarted.get("b", 4) is None
    assert all(restarted.get(t, 4) is not None for t in "acd")


def test_a_smaller_bound_at_start_evicts_down_to_it(tmp_path):
    size = entry_size(4)
    cache = DiskEmbeddingCache(tmp_path, KEY, 2**20)
    for n, text in enumerate("abcd"):
        cache.put(text, 4, states(4, n))
        os.utime(cache.path(text, 4), (1000 * (n + 1), 1000 * (n + 1)))
    smaller = DiskEmbeddingCache(tmp_path, KEY, 2 * size)
    assert len(smaller) == 2 and smaller.bytes == 2 * size
    assert [smaller.get(t, 4) is not None for t in "abcd"] == [False, False, True, True]


def test_other_models_entries_count_toward_the_bound_and_go_first(tmp_path):
    size = entry_size(4)
    old = DiskEmbeddingCache(tmp_path, "b" * 64, 2**20)
    old.put("a cat", 4, states(4))
    os.utime(old.path("a cat", 4), (1000, 1000))
    cache = DiskEmbeddingCache(tmp_path, KEY, 2 * size)
    assert cache.bytes == size
    cache.put("x", 4, states(4, 1))
    cache.put("y", 4, states(4, 2))
    assert not old.path("a cat", 4).exists()
    assert cache.bytes == 2 * size == sum(p.stat().st_size for p in files(tmp_path))


def test_value_bigger_than_the_bound_is_not_stored(tmp_path):
    size = entry_size(4)
    cache = DiskEmbeddingCache(tmp_path, KEY, 2 * size)
    cache.put("small", 4, states(4))
    cache.put("big", 16, states(16))  # 4 KiB of data > 2 small entries
    assert cache.get("big", 16) is None
    assert cache.get("small", 4) is not None  # and storing nothing evicted nothing
    assert len(cache) == 1 and cache.bytes == size and len(files(tmp_path)) == 1


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _wrong_shape(path: Path) -> None:
    np.save(path, states(5))  # stored under length 4


def _wrong_dtype(path: Path) -> None:
    np.save(path, states(4).astype(np.float64))


def _one_dimensional(path: Path) -> None:
    np.save(path, np.zeros(4 * C, np.float32))


def _pickled(path: Path) -> None:
    np.save(path, np.array([{"x": 1}] * 4, dtype=object), allow_pickle=True)


def _huge_header(path: Path) -> None:
    # a header that claims 10^12 rows: must be refused before numpy allocates for it
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (4, 10**12)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 4 * C * 4)


def _extra_bytes(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 16)


@pytest.mark.parametrize("corrupt", [_truncated, _garbage, _empty, _wrong_shape, _wrong_dtype, _one_dimensional,
                                     _pickled, _huge_header, _extra_bytes])
def test_a_corrupt_entry_is_a_miss_and_is_removed(tmp_path, corrupt):
    DiskEmbeddingCache(tmp_path, KEY, 2**20).put("a cat", 4, states(4))
    path = only_entry(tmp_path)
    corrupt(path)
    cache = DiskEmbeddingCache(tmp_path, KEY, 2**20)
    assert cache.get("a cat", 4) is None
    assert not path.exists()
    assert len(cache) == 0 and cache.bytes == 0
    cache.put("a cat", 4, states(4))  # and the entry can be written again
    assert cache.get("a cat", 4).tobytes() == states(4).tobytes()


def test_corrupting_an_entry_while_running_is_a_miss(tmp_path):
    cache = DiskEmbeddingCache(tmp_path, KEY, 2**20)
    cache.put("a cat", 4, states(4))
    _garbage(cache.path("a cat", 4))
    assert cache.get("a cat", 4) is None
    assert files(tmp_path) == [] and len(cache) == 0 and cache.bytes == 0


def test_writes_leave_no_temp_files(tmp_path):
    cache = DiskEmbeddingCache(tmp_path, KEY, 2**20)
    for n in range(5):
        cache.put(f"prompt {n}", 4, states(4, n))
    cache.put("prompt 0", 4, states(4, 0))  # again: an existing entry
    assert len(files(tmp_path)) == 5
    assert all(re.fullmatch(r"[0-9a-f]{64}\.npy", p.name) for p in files(tmp_path))


def test_a_failed_write_is_not_raised_and_leaves_nothing(tmp_path, monkeypatch):
    cache = DiskEmbeddingCache(tmp_path, KEY, 2**20)

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    cache.put("a cat", 4, states(4))
    monkeypatch.undo()
    assert files(tmp_path) == []
    assert cache.get("a cat", 4) is None and len(cache) == 0 and cache.bytes == 0


def test_temp_files_of_a_crashed_writer_are_removed_at_start(tmp_path):
    cache = DiskEmbeddingCache(tmp_path, KEY, 2**20)
    stale, fresh = cache.model_folder / ".tmp-crashed.npy", cache.model_folder / ".tmp-writing.npy"
    stale.write_bytes(b"half an entry")
    fresh.write_bytes(b"being written by another process")
    os.utime(stale, (1000, 1000))
    DiskEmbeddingCache(tmp_path, KEY, 2**20)
    assert not stale.exists() and fresh.exists()


def test_folder_is_private(tmp_path):
    cache = DiskEmbeddingCache(tmp_path / "new" / "cache", KEY, 2**20)
    assert (tmp_path / "new" / "cache").stat().st_mode & 0o777 == 0o700
    assert cache.model_folder.stat().st_mode & 0o777 == 0o700


def test_put_refuses_states_of_the_wrong_length(tmp_path):
    cache = DiskEmbeddingCache(tmp_path, KEY, 2**20)
    with pytest.raises(ValueError):
        cache.put("a cat", 8, states(4))
    assert files(tmp_path) == []


def test_threads_keep_the_count_and_the_bound(tmp_path):
    size = entry_size(4)
    cache = DiskEmbeddingCache(tmp_path, KEY, 5 * size)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for n in range(40):
                text = f"prompt {(worker * 7 + n) % 12}"
                if cache.get(text, 4) is None:
                    cache.put(text, 4, states(4))
        except BaseException as exc:  # surfaced below: an exception in a thread would otherwise pass silently
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cache.bytes <= cache.max_bytes
    assert cache.bytes == sum(p.stat().st_size for p in files(tmp_path)) and len(cache) == len(files(tmp_path))


def test_tiered_cache_checks_memory_then_disk(tmp_path):
    from engine.text_cache import EmbeddingCache

    disk = DiskEmbeddingCache(tmp_path, KEY, 2**20)
    DiskEmbeddingCache(tmp_path, KEY, 2**20).put("a cat", 4, states(4))
    memory = EmbeddingCache(2**20)
    tiered = TieredEmbeddingCache(memory, disk)
    assert tiered.get(("a cat", 4)).tobytes() == states(4).tobytes()  # from disk...
    assert memory.get(("a cat", 4)) is not None  # ...promoted into memory
    only_entry(tmp_path).unlink()
    assert tiered.get(("a cat", 4)) is not None  # so the next hit never reads the disk
    tiered.put(("a dog", 4), states(4, 1))  # written through to both
    assert memory.get(("a dog", 4)) is not None
    assert DiskEmbeddingCache(tmp_path, KEY, 2**20).get("a dog", 4).tobytes() == states(4, 1).tobytes()


def test_a_header_claiming_a_huge_shape_is_refused_before_loading(tmp_path, monkeypatch):
    DiskEmbeddingCache(tmp_path, KEY, 2**20).put("a cat", 4, states(4))
    _huge_header(only_entry(tmp_path))
    cache = DiskEmbeddingCache(tmp_path, KEY, 2**20)

    calls = []  # recorded, not raised: the cache turns any exception from loading into a miss

    def load(*args, **kwargs):
        calls.append(args)
        raise MemoryError("np.load reached: it would allocate for the claimed shape")

    monkeypatch.setattr(np, "load", load)
    assert cache.get("a cat", 4) is None
    assert calls == []
    assert files(tmp_path) == []


def test_clearing_empties_memory_and_keeps_the_disk(tmp_path):
    from engine.text_cache import EmbeddingCache

    memory = EmbeddingCache(2**20)
    tiered = TieredEmbeddingCache(memory, DiskEmbeddingCache(tmp_path, KEY, 2**20))
    tiered.put(("a cat", 4), states(4))
    assert memory.bytes > 0
    tiered.clear()
    assert memory.bytes == 0 and not memory.entries and memory.get(("a cat", 4)) is None
    assert tiered.get(("a cat", 4)).tobytes() == states(4).tobytes()  # the disk tier outlives a clear


def test_open_text_cache_keys_the_disk_by_the_text_encoders_weights(tmp_path):
    from engine.text_cache import EmbeddingCache, open_text_cache

    graph = tmp_path / "text_encoder.onnx"
    graph.write_bytes(b"graph")
    assert isinstance(open_text_cache(2**20, None, graph, {}, 2**20), EmbeddingCache)  # no folder: memory only
    hashes = {"text_encoder.onnx": {"sha256": KEY}}
    assert open_text_cache(2**20, tmp_path / "c", graph, hashes, 2**20).disk.model_key == KEY
    (tmp_path / "text_encoder.onnx.data").write_bytes(b"w" * 10)
    hashes["text_encoder.onnx.data"] = {"sha256": "b" * 64}  # external weights: their hash is the key
    assert open_text_cache(2**20, tmp_path / "c", graph, hashes, 2**20).disk.model_key == "b" * 64
    unhashed = open_text_cache(2**20, tmp_path / "c", graph, {}, 2**20)
    assert unhashed.memory.max_bytes == 2**20 and unhashed.disk.max_bytes == 2**20
    assert re.fullmatch(r"text_encoder\.onnx\.data-10-[0-9]+", unhashed.disk.model_key)  # name, size, mtime
