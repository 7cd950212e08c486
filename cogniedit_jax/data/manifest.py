"""The manifest: one JSON object per line, the single format every data source is turned into.

    {"id": "seed2:split_0001:17", "source": "/data/a.jpg", "instruction": "Make the sky red",
     "target": "/data/b.jpg",                                  # optional: the reference edit
     "enhanced": {"info": ..., "think": ..., "answer": ..., "object": ...},  # optional: the MLLM's parts
     "meta": {...}}                                            # optional: free-form provenance

Relative image paths are relative to the manifest's folder. Reading validates every line and skips bad ones
with a `DataError` naming `file:line`, so a long run never dies on one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from cogniedit_jax.data.errors import DataError, SkipLog
from cogniedit_jax.data.images import DEFAULT_MAX_PIXELS, probe_size

# The four parts of a knowledge-enhanced instruction (paper appendix 9, eq. 11), in the MLLM's order.
ENHANCED_PARTS = ("info", "think", "answer", "object")
_FIELDS = ("id", "source", "instruction", "target", "enhanced", "meta")


@dataclasses.dataclass(frozen=True)
class Enhanced:
    info: str
    think: str
    answer: str
    object: str


@dataclasses.dataclass(frozen=True)
class ManifestItem:
    id: str
    source: str
    instruction: str
    target: str | None = None
    enhanced: Enhanced | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"id": self.id, "source": self.source, "instruction": self.instruction}
        if self.target is not None:
            out["target"] = self.target
        if self.enhanced is not None:
            out["enhanced"] = dataclasses.asdict(self.enhanced)
        if self.meta:
            out["meta"] = self.meta
        return out


def check_text(value, where: str, field: str) -> str:
    """A usable instruction-like string, stripped; raises DataError naming `where` and `field` otherwise."""
    if not isinstance(value, str):
        raise DataError(where, "bad_field", f"field {field!r} must be a string, found {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # json accepts lone surrogates ("\ud800") that no encoder can write
        raise DataError(where, "bad_text",
                        f"field {field!r} is not valid UTF-8 text ({e.reason} at {e.start})")
    text = value.strip()
    if not text:
        raise DataError(where, "empty_instruction", f"field {field!r} is empty")
    return text


def _check_path(value, where: str, field: str, base: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(where, "bad_field",
                        f"field {field!r} must be a non-empty path string, found {value!r}")
    return str(base / value) if not os.path.isabs(value) else value


def item_from_json(obj, where: str, base: Path = Path(".")) -> ManifestItem:
    """Validate one decoded manifest line; relative paths are resolved against `base`."""
    if not isinstance(obj, dict):
        raise DataError(where, "bad_line", f"expected a JSON object, found {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise DataError(where, "bad_field", f"unknown fields {unknown}; expected some of {list(_FIELDS)}")
    missing = [k for k in ("id", "source", "instruction") if k not in obj]
    if missing:
        raise DataError(where, "bad_field", f"missing required fields {missing}")
    item_id = obj["id"]
    if not isinstance(item_id, str) or not item_id.strip():
        raise DataError(where, "bad_field", f"field 'id' must be a non-empty string, found {item_id!r}")
    enhanced = obj.get("enhanced")
    if enhanced is not None:
        if not isinstance(enhanced, dict) or set(enhanced) != set(ENHANCED_PARTS):
            found = sorted(enhanced) if isinstance(enhanced, dict) else type(enhanced).__name__
            raise DataError(where, "bad_field", f"field 'enhanced' must have exactly {list(ENHANCED_PARTS)}, "
                                                f"found {found}")
        enhanced = Enhanced(**{k: check_text(enhanced[k], where, f"enhanced.{k}") for k in ENHANCED_PARTS})
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(where, "bad_field", f"field 'meta' must be an object, found {type(meta).__name__}")
    target = obj.get("target")
    return ManifestItem(
        id=item_id,
        source=_check_path(obj["source"], where, "source", base),
        instruction=check_text(obj["instruction"], where, "instruction"),
        target=None if target is None else _check_path(target, where, "target", base),
        enhanced=enhanced,
        meta=meta,
    )


def iter_jsonl(path, skips: SkipLog | None):
    """(where, object) for each non-blank line of a JSONL file, `where` = "path:line". Lines are decoded one
    by one as strict UTF-8, so bad bytes cost that line only. Bad lines go to `skips` (None: raise)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    byte, column = raw[e.start], e.start + 1
                    raise DataError(where, "bad_text",
                                    f"line is not valid UTF-8 (byte {byte:#04x} at column {column})")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(where, "bad_line", f"malformed JSON: {e.msg} at column {e.colno}")
            except DataError as err:
                if skips is None:
                    raise
                skips.add(err)
                continue
            yield where, obj


def read_manifest(path, *, strict: bool = False) -> tuple[list[ManifestItem], SkipLog]:
    """All valid items of a manifest and a log of the skipped lines (`strict`: raise on the first bad line).
    A repeated id is an error on the later line."""
    path = Path(path)
    base = path.resolve().parent
    items, skips, seen = [], SkipLog(), {}
    for where, obj in iter_jsonl(path, None if strict else skips):
        try:
            item = item_from_json(obj, where, base)
            if item.id in seen:
                raise DataError(where, "duplicate_id", f"id {item.id!r} already used at {seen[item.id]}")
        except DataError as err:
            if strict:
                raise
            skips.add(err)
            continue
        seen[item.id] = where
        items.append(item)
    return items, skips


def write_manifest(path, items) -> int:
    """Write items as JSONL (UTF-8, one object a line), atomically: a crash leaves the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def probe_item(item: ManifestItem, max_pixels: int = DEFAULT_MAX_PIXELS) -> ManifestItem:
    """Check that the item's images exist and have sane headers (no decoding); returns the item."""
    for path in (item.source, item.target):
        if path is not None:
            probe_size(path, max_pixels)
    return item


def collect(candidates, make, n: int | None, skips: SkipLog) -> list:
    """`make(c)` for candidates in order until `n` succeed (all if None); failures are logged and skipped, so
    a seeded shuffle followed by `collect` samples n good items deterministically."""
    out = []
    for c in candidates:
        if n is not None and len(out) >= n:
            break
        try:
            out.append(make(c))
        except DataError as err:
            skips.add(err)
    return out
