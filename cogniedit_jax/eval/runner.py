"""The resumable evaluation loop: edit every item (batched by resolution bucket), judge it, write one JSONL
record per finished item. The editor, the judge and the optional instruction rewriter are injected:

    edit_fn(images uint8 [B, H, W, 3], instructions) -> uint8 [B, H', W', 3]   (one bucket: H, W shared)
    judge_fn(items, judge_sources, edits) -> one {"scores", "judge_failed", "judge"} per item
    reason_fn(images, instructions) -> [{"instruction", "fallback", ...}]      (the decomposer, for "-r1")

Output folder: `items.jsonl` (a record is appended, flushed and fsynced once its item is finished; a
restarted run skips every id it finds there), `edits/<id>.png` (an edit already on disk whose record is
missing, because the run died between editing and judging, is judged without editing again) and
`sources/<id>.jpg` (a small copy of the judge's source for the HTML page).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from cogniedit_jax.data.buckets import TARGET_AREA, edit_dimensions, resize_to
from cogniedit_jax.data.errors import DataError
from cogniedit_jax.data.images import probe_size
from cogniedit_jax.eval.items import EvalItem, load_image

log = logging.getLogger("cogniedit_jax.eval")
RECORDS = "items.jsonl"
THUMB_SIDE = 512


def read_records(out_dir) -> list[dict]:
    """The finished records in `out_dir/items.jsonl`; a torn last line (the run died while writing it) is
    ignored, so that item runs again."""
    path = Path(out_dir) / RECORDS
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d is not a complete record (an interrupted write?); that item will run again", path, n)
    return records


def _size(src) -> tuple[int, int]:
    if isinstance(src, bytes):
        with Image.open(io.BytesIO(src)) as img:
            return img.size
    return probe_size(src)


class _Writer:
    def __init__(self, out_dir: Path):
        path = out_dir / RECORDS
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):  # drop a torn last record, or the next one would join it
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, record: dict):
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


def _base(item: EvalItem) -> dict:
    return {"id": item.id, "group": item.group, "instruction": item.instruction, "meta": item.meta}


def _save_thumb(array: np.ndarray, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    img.thumbnail((THUMB_SIDE, THUMB_SIDE))
    img.save(path, quality=90)


def run_items(items: list[EvalItem], out_dir, edit_fn: Callable, judge_fn: Callable, *, batch_size: int = 1,
              reason_fn: Callable | None = None, target_area: int | None = TARGET_AREA) -> list[dict]:
    """Runs every item of `items` not yet finished in `out_dir`; returns all records (old and new), in the
    order of `items`. Sources are resized to the edit pipeline's size for `target_area` pixels (None: edited
    at their own size, batched by it). Items a one-image editor cannot run (several inputs) and items whose source image cannot
    be read get a record with that status: they are reported, never dropped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = {r["id"] for r in read_records(out)}
    todo = [it for it in items if it.id not in done]
    log.info("%d items, %d finished before, %d to run", len(items), len(done), len(todo))
    writer = _Writer(out)
    try:
        buckets: dict[tuple[int, int], list[EvalItem]] = {}
        for it in todo:
            if it.extra_sources:
                writer.write({**_base(it), "status": "unsupported", "scores": None,
                              "error": f"needs {1 + len(it.extra_sources)} input images; the editor takes one"})
                continue
            try:
                size = _size(it.source)
                buckets.setdefault(edit_dimensions(*size, target_area) if target_area else size, []).append(it)
            except (DataError, OSError, ValueError) as e:
                writer.write({**_base(it), "status": "source_error", "scores": None, "error": str(e)})
        for (w, h), bucket in buckets.items():
            for start in range(0, len(bucket), batch_size):
                _run_batch(bucket[start:start + batch_size], (w, h), out, writer, edit_fn, judge_fn, reason_fn)
    finally:
        writer.close()
    by_id = {r["id"]: r for r in read_records(out)}
    return [by_id[it.id] for it in items if it.id in by_id]


def _run_batch(batch, size, out: Path, writer: _Writer, edit_fn, judge_fn, reason_fn):
    sources, judge_sources, ok = [], [], []
    for it in batch:
        try:
            sources.append(load_image(it.source, it.id))
            judge_sources.append(load_image(it.judge_source, it.id) if it.judge_source is not None else sources[-1])
            ok.append(it)
        except DataError as e:
            writer.write({**_base(it), "status": "source_error", "scores": None, "error": str(e)})
    if not ok:
        return
    edit_paths = [out / "edits" / f"{it.file_stem}.png" for it in ok]
    records = [_base(it) for it in ok]
    todo = [i for i, p in enumerate(edit_paths) if not p.exists()]
    if todo:
        instructions = [ok[i].instruction for i in todo]
        if reason_fn is not None:
            rewritten = reason_fn([sources[i] for i in todo], instructions)
            instructions = [r["instruction"] for r in rewritten]
            for i, r in zip(todo, rewritten):
                records[i]["decomposition"] = r
        for i, text in zip(todo, instructions):
            records[i]["edit_instruction"] = text
        resized = np.stack([sources[i] if sources[i].shape[1::-1] == size
                            else np.asarray(resize_to(Image.fromarray(sources[i]), *size)) for i in todo])
        edited = np.asarray(edit_fn(resized, instructions))
        if edited.dtype != np.uint8 or edited.shape[0] != len(todo) or edited.ndim != 4:
            raise ValueError(f"edit_fn returned {edited.dtype} {list(edited.shape)}; expected uint8 "
                             f"[{len(todo)}, H, W, 3]")
        for i, e in zip(todo, edited):
            edit_paths[i].parent.mkdir(parents=True, exist_ok=True)
            tmp = edit_paths[i].with_suffix(".tmp.png")
            Image.fromarray(e).save(tmp)
            os.replace(tmp, edit_paths[i])  # a killed run never leaves a half-written edit behind
    edits = [np.asarray(Image.open(p).convert("RGB")) for p in edit_paths]
    judged = judge_fn(ok, judge_sources, edits)
    for it, rec, src, path, j in zip(ok, records, judge_sources, edit_paths, judged, strict=True):
        thumb = out / "sources" / f"{it.file_stem}.jpg"
        _save_thumb(src, thumb)
        rec.update(j, status="judge_failed" if j["judge_failed"] else "ok",
                   image=str(path.relative_to(out)), source_image=str(thumb.relative_to(out)))
        writer.write(rec)
