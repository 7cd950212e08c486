"""GEdit-Bench (stepfun-ai/GEdit-Bench, MIT) from a local copy of its published layout.

The hub data set is parquet: one row per edit with `key`, `task_type`, `instruction`, `instruction_language`
("en" / "cn"), `input_image`, `input_image_raw` (images as `{"bytes", "path"}` structs, the `datasets`
Image feature) and `Intersection_exist` (bool, the paper's "intersection subset"); 1,212 rows = 606 edits in
English and in Chinese (Step1X-Edit GEdit-Bench/generate_image_example.py lists the fields). `load_gedit`
reads every `*.parquet` under the folder (pyarrow), or else `*.jsonl` files with the same fields, whose
images are file paths relative to the JSONL file.

The editor gets `input_image_raw` (as the published generation example does; the edit pipeline resizes it to
about one megapixel) and the judge compares against `input_image` (test_gedit_score.py's source image).
"""

from __future__ import annotations

import json
from pathlib import Path

from cogniedit_jax.data.errors import DataError
from cogniedit_jax.eval.items import EvalItem

TASK_TYPES = ("background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
              "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer")
LANGUAGES = ("en", "cn")  # the data set's values; "zh" matches nothing (a trap in some ports)
FIELDS = ("key", "task_type", "instruction", "instruction_language", "input_image", "Intersection_exist")


def _image(value, base: Path, where: str):
    """A parquet image struct's bytes, or a JSONL image path (relative to the file)."""
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes | bytearray) and value["bytes"]:
        return bytes(value["bytes"])
    if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]:
        return base / value["path"]
    if isinstance(value, str) and value:
        return base / value
    raise DataError(where, "bad_field", f"expected an image (bytes or a path), found {type(value).__name__}")


def _item(row: dict, base: Path, where: str) -> EvalItem:
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise DataError(where, "bad_field", f"missing field(s) {missing}; expected {list(FIELDS)}")
    task, lang, key = row["task_type"], row["instruction_language"], row["key"]
    if task not in TASK_TYPES:
        raise DataError(where, "bad_field", f"task_type {task!r} is not one of GEdit-Bench's {TASK_TYPES}")
    if lang not in LANGUAGES:
        raise DataError(where, "bad_field", f"instruction_language {lang!r} is not one of {LANGUAGES}")
    if not isinstance(key, str) or not key:
        raise DataError(where, "bad_field", f"key {key!r} is not a non-empty string")
    if not isinstance(row["instruction"], str) or not row["instruction"].strip():
        raise DataError(where, "empty_instruction", "instruction is empty")
    if not isinstance(row["Intersection_exist"], bool):
        raise DataError(where, "bad_field", f"Intersection_exist {row['Intersection_exist']!r} is not a bool")
    judge_source = _image(row["input_image"], base, f"{where}: input_image")
    raw = row.get("input_image_raw")
    source = _image(raw, base, f"{where}: input_image_raw") if raw else judge_source
    return EvalItem(id=f"{lang}/{task}/{key}", group=task, instruction=row["instruction"], source=source,
                    judge_source=judge_source,
                    meta={"language": lang, "intersection": row["Intersection_exist"], "key": key})


def _rows(path: Path):
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", row
        return
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}", "bad_line", f"not JSON: {e}") from None


def load_gedit(root) -> list[EvalItem]:
    """Every GEdit-Bench row under `root`, in file order; a malformed row raises `DataError` naming its file and
    row (a benchmark with silently dropped rows is not the benchmark). Image files are checked when read."""
    root = Path(root)
    files = sorted(root.rglob("*.parquet")) or sorted(root.rglob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no GEdit-Bench *.parquet (or *.jsonl) files under {root}")
    items, seen = [], {}
    for path in files:
        for where, row in _rows(path):
            if not isinstance(row, dict):
                raise DataError(where, "bad_line", "expected an object")
            item = _item(row, path.parent, where)
            if item.id in seen:
                raise DataError(where, "bad_field", f"repeated key: {item.id} is also at {seen[item.id]}")
            seen[item.id] = where
            items.append(item)
    return items
