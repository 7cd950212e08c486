"""The prepared-example cache that `python -m cogniedit_jax.prepare` writes and the trainer reads.

    CACHE_DIR/index.json                settings, committed shards, their records (id, bucket, text lengths)
    CACHE_DIR/shard-000000.safetensors  arrays of up to `shard_size` records; texts in its metadata

Per record (row r of a shard) the arrays are `r/latents` ([S, 4C]: the source image's VAE latents, mean of
the posterior, normalised with latents_mean/std and packed in 2x2 patches: exactly the `source_latents` of the
edit loop's `EditCondition`), `r/source` (uint8 [H, W, 3], the source at its bucket size, for the judge),
`r/prompt_embeds` ([L, D], the condition encoder's rows without padding) and, when the cache has a negative
prompt, `r/negative_embeds` ([L', D]). Arrays keep the dtype they were computed in (bf16 on GPU). The metadata
holds the texts (instruction, the encoded prompt, the enhanced parts) and a CRC-32 of every array, so damage
inside a shard is found on read, not trained on.

Writes are atomic: a shard is written to a temporary file, synced and renamed, then the index is rewritten the
same way. A crash leaves every committed record readable; a shard renamed but not yet indexed is adopted when
the writer next opens the cache (its settings must match), so deleting index.json rebuilds it from the shards.
One writer at a time (a lock file); any number of readers.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from cogniedit_jax.data.errors import DataError
from cogniedit_jax.data.loader import Loader

log = logging.getLogger("cogniedit_jax.data.cache")

FORMAT = "cogniedit-cache/1"
INDEX_NAME = "index.json"
_SHARD_GLOB = "shard-*.safetensors"


@dataclasses.dataclass(frozen=True)
class CacheRecord:
    """One prepared example as `CacheWriter.add` takes it (see the module docstring for the arrays)."""

    id: str
    bucket: tuple[int, int]  # (height, width) in pixels: the edit size of the source
    latents: np.ndarray
    source: np.ndarray
    prompt_embeds: np.ndarray
    negative_embeds: np.ndarray | None
    instruction: str  # as in the manifest
    prompt: str  # the text that was encoded (the enhanced answer, or the instruction)
    enhanced: dict | None  # the four parts, when the item has them

    def check(self) -> None:
        h, w = self.bucket
        problems = []
        if self.source.dtype != np.uint8 or self.source.shape != (h, w, 3):
            problems.append(f"source must be uint8 [{h}, {w}, 3] (its bucket), found {self.source.dtype} "
                            f"{list(self.source.shape)}")
        for name in ("latents", "prompt_embeds", "negative_embeds"):
            value = getattr(self, name)
            if value is not None and value.ndim != 2:
                problems.append(f"{name} must be 2-D, found shape {list(value.shape)}")
        if problems:
            raise ValueError(f"cache record {self.id!r}: " + "; ".join(problems))

    def arrays(self, row: int) -> dict[str, np.ndarray]:
        named = {"latents": self.latents, "source": self.source, "prompt_embeds": self.prompt_embeds,
                 "negative_embeds": self.negative_embeds}
        return {f"{row}/{k}": np.ascontiguousarray(v) for k, v in named.items() if v is not None}


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1))


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path), fsync, rename over `path`, fsync the folder: readers see the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _index_entry(record: CacheRecord) -> dict:
    neg = record.negative_embeds
    return {"id": record.id, "bucket": list(record.bucket), "text_length": int(record.prompt_embeds.shape[0]),
            "negative_length": None if neg is None else int(neg.shape[0])}


def _shard_metadata(path: Path) -> dict:
    """The parsed metadata of a shard; DataError naming the file when it cannot be read."""
    try:
        with safe_open(path, "numpy") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise DataError(str(path), "corrupt_cache", "cache shard is missing")
    except (SafetensorError, OSError) as e:
        raise DataError(str(path), "corrupt_cache", f"cache shard is unreadable ({type(e).__name__}: {e})")
    if meta.get("format") != FORMAT:
        raise DataError(str(path), "corrupt_cache",
                        f"not a cache shard of format {FORMAT!r} (found {meta.get('format')!r})")
    try:
        return {"settings": json.loads(meta["settings"]), "records": json.loads(meta["records"])}
    except (KeyError, ValueError) as e:
        raise DataError(str(path), "corrupt_cache", f"cache shard metadata is damaged ({e})")


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(str(path), "corrupt_cache",
                        f"cache index is unreadable ({e}); delete it and run prepare again to rebuild it "
                        "from the shard files")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(str(path), "corrupt_cache", f"not a cache index of format {FORMAT!r}")
    return index


def _settings_diff(saved: dict, now: dict) -> str:
    keys = sorted(set(saved) | set(now))
    return ", ".join(f"{k}: {saved.get(k)!r} vs {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k))


class CacheWriter:
    """Appends records to a cache, `shard_size` per shard; resumable: `done` holds the ids already committed.

    `settings` (JSON-able) records what produced the cache (models, negative prompt, sizes); opening an
    existing cache with different settings raises, so one cache never mixes two configurations.
    Use as a context manager, or call `close()`, to commit the last partial shard.
    """

    def __init__(self, cache_dir, settings: dict, shard_size: int = 32):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, found {shard_size}")
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.settings = json.loads(json.dumps(settings))  # as it reads back from JSON (tuples -> lists)
        self.shard_size = shard_size
        self._lock = open(self.dir / ".lock", "w")  # noqa: SIM115 (held, and so locked, until close())
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"another process is writing the cache {self.dir} (lock {self.dir / '.lock'})")
        try:
            self._open_index()
        except BaseException:
            self._lock.close()
            raise
        self._buffer: list[CacheRecord] = []

    def _open_index(self) -> None:
        self.index_path = self.dir / INDEX_NAME
        self.index = {"format": FORMAT, "settings": self.settings, "shards": []}
        if self.index_path.exists():
            self.index = _read_index(self.index_path)
            diff = _settings_diff(self.index.get("settings", {}), self.settings)
            if diff:
                raise ValueError(f"the cache {self.dir} was prepared with other settings (saved vs now: "
                                 f"{diff}); use another cache_dir, or delete this one")
        for tmp in self.dir.glob("*.tmp"):  # a write that crashed before its rename
            tmp.unlink()
        self._adopt_orphans()
        self.done = {r["id"] for s in self.index["shards"] for r in s["records"]}
        numbers = [int(p.stem.split("-")[1]) for p in self.dir.glob(_SHARD_GLOB)]
        self._next = max(numbers, default=-1) + 1

    def _adopt_orphans(self) -> None:
        """Shards renamed into place whose index update did not happen (a crash in between)."""
        indexed = {s["file"] for s in self.index["shards"]}
        adopted = False
        for path in sorted(self.dir.glob(_SHARD_GLOB)):
            if path.name in indexed:
                continue
            try:
                meta = _shard_metadata(path)
            except DataError as err:
                log.warning("ignoring %s", err)
                continue
            if meta["settings"] != self.settings:
                log.warning("ignoring %s: prepared with other settings (%s)", path,
                            _settings_diff(meta["settings"], self.settings))
                continue
            entries = [{k: r[k] for k in ("id", "bucket", "text_length", "negative_length")}
                       for r in meta["records"]]
            self.index["shards"].append({"file": path.name, "records": entries})
            adopted = True
            log.info("adopted %s (%d records) into the index", path.name, len(entries))
        if adopted:
            self._write_index()

    def _write_index(self) -> None:
        text = json.dumps(self.index, ensure_ascii=False)
        _atomic_write(self.index_path, lambda p: p.write_text(text, encoding="utf-8"))

    def add(self, record: CacheRecord) -> None:
        record.check()
        if record.id in self.done or any(r.id == record.id for r in self._buffer):
            raise ValueError(f"cache record {record.id!r} is already in {self.dir}")
        self._buffer.append(record)
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered records as one shard (no-op when empty)."""
        if not self._buffer:
            return
        path = self.dir / f"shard-{self._next:06d}.safetensors"
        arrays, texts = {}, []
        for row, rec in enumerate(self._buffer):
            named = rec.arrays(row)
            arrays.update(named)
            crcs = {k.split("/", 1)[1]: _crc(v) for k, v in named.items()}
            texts.append({**_index_entry(rec), "instruction": rec.instruction, "prompt": rec.prompt,
                          "enhanced": rec.enhanced, "crc32": crcs})
        metadata = {"format": FORMAT, "settings": json.dumps(self.settings, ensure_ascii=False),
                    "records": json.dumps(texts, ensure_ascii=False)}
        _atomic_write(path, lambda p: save_file(arrays, str(p), metadata=metadata))
        self.index["shards"].append({"file": path.name, "records": [_index_entry(r) for r in self._buffer]})
        self._write_index()
        self.done.update(r.id for r in self._buffer)
        self._next += 1
        self._buffer = []

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CacheReader:
    """Reads records by id. `ids` and `buckets` list the records in index order (for `Loader`).

    `read(id)` returns a dict: id, bucket (height, width), latents [S, 4C], source uint8 [H, W, 3],
    prompt_embeds [T, D] zero-padded to `text_length` and prompt_mask [T] int32 (1 on real tokens), the same
    for negative_embeds / negative_mask when the cache has a negative prompt, and the texts instruction,
    prompt, enhanced. `text_length` defaults to the longest prompt or negative prompt in the cache, so every
    record has one shape under jit. A missing or damaged shard raises DataError naming the file.
    """

    def __init__(self, cache_dir, text_length: int | None = None):
        self.dir = Path(cache_dir)
        index_path = self.dir / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: is {self.dir} a cache written by "
                                    "`python -m cogniedit_jax.prepare`?")
        index = _read_index(index_path)
        self.settings = index.get("settings", {})
        self._where: dict[str, tuple[str, int]] = {}
        self.ids, self.buckets, lengths = [], [], []
        for shard in index["shards"]:
            for row, rec in enumerate(shard["records"]):
                self._where[rec["id"]] = (shard["file"], row)
                self.ids.append(rec["id"])
                self.buckets.append(tuple(rec["bucket"]))
                lengths += [n for n in (rec["text_length"], rec["negative_length"]) if n is not None]
        longest = max(lengths, default=0)
        if text_length is not None and text_length < longest:
            raise ValueError(f"text_length={text_length} is shorter than the longest prompt in {self.dir} "
                             f"({longest} tokens)")
        self.text_length = longest if text_length is None else text_length
        # Parsed metadata of recently read shards (ids and texts, no arrays), shared by the loader's threads.
        self._records = functools.lru_cache(maxsize=16)(self._load_records)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._where

    def _load_records(self, file: str) -> list[dict]:
        return _shard_metadata(self.dir / file)["records"]

    def texts(self, item_id: str) -> dict:
        """The record's index entry and texts (instruction, prompt, enhanced), from the shard's metadata."""
        file, row = self._locate(item_id)
        return self._records(file)[row]

    def _locate(self, item_id: str) -> tuple[str, int]:
        if item_id not in self._where:
            raise KeyError(f"id {item_id!r} is not in the cache {self.dir}")
        return self._where[item_id]

    def _pad(self, embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        padded = np.zeros((self.text_length, embeds.shape[1]), embeds.dtype)
        padded[:embeds.shape[0]] = embeds
        mask = np.zeros(self.text_length, np.int32)
        mask[:embeds.shape[0]] = 1
        return padded, mask

    def read(self, item_id: str) -> dict:
        file, row = self._locate(item_id)
        path = self.dir / file
        meta = self._records(file)[row]
        if meta["id"] != item_id:
            raise DataError(str(path), "corrupt_cache", f"row {row} holds id {meta['id']!r}, the index says "
                                                        f"{item_id!r}")
        arrays = {}
        try:
            with safe_open(path, "numpy") as f:
                for name in meta["crc32"]:
                    arrays[name] = f.get_tensor(f"{row}/{name}")
        except (SafetensorError, OSError) as e:  # a truncated or rewritten file
            raise DataError(str(path), "corrupt_cache",
                            f"cannot read record {item_id!r} (row {row}): {type(e).__name__}: {e}")
        for name, crc in meta["crc32"].items():
            if _crc(arrays[name]) != crc:
                raise DataError(str(path), "corrupt_cache",
                                f"record {item_id!r} (row {row}): array {name!r} fails its CRC-32 check")
        out = {"id": item_id, "bucket": tuple(meta["bucket"]), "latents": arrays["latents"],
               "source": arrays["source"], "instruction": meta["instruction"], "prompt": meta["prompt"],
               "enhanced": meta["enhanced"]}
        out["prompt_embeds"], out["prompt_mask"] = self._pad(arrays["prompt_embeds"])
        if "negative_embeds" in arrays:
            out["negative_embeds"], out["negative_mask"] = self._pad(arrays["negative_embeds"])
        return out


def cache_loader(cache_dir, *, global_batch_size: int, seed: int = 0, text_length: int | None = None,
                 **loader_kwargs):
    """A training `Loader` over a prepared cache: batches of one bucket, stacked `CacheReader.read` dicts; a
    damaged record is counted in `loader.skips` and its row masked out (`valid`)."""
    reader = CacheReader(cache_dir, text_length)
    return Loader(reader.buckets, lambda i: reader.read(reader.ids[i]), global_batch_size=global_batch_size,
                  seed=seed, **loader_kwargs)
