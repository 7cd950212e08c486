"""KRIS-Bench (mercurystraw/Kris_Bench) from a local copy of its published layout: `KRIS_Bench/<folder>/` with the
images and an `annotation.json` keyed by id: `ori_img` (a file name, or a list for multi-element composition
and temporal prediction), `gt_img` (viewpoint change), `ins_en`, `explain_en`.

Folder -> task group -> knowledge type is the table of the KRIS-Bench summary script (BAGEL's
eval/gen/kris/summarize.py, `kris_benchamrk_type` and `meta_categories`); KP is scored on the three groups
whose metric list holds `knowledge_score` (Social Science, Natural Science, Logical Reasoning: the ten folders
of metrics_knowledge.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from cogniedit_jax.data.errors import DataError
from cogniedit_jax.eval.items import EvalItem

GROUPS = {
    "Attribute Perception": ("count_change", "color_change", "size_adjustment", "part_completion",
                             "anomaly_correction"),
    "Spatial Perception": ("viewpoint_change", "position_movement"),
    "Temporal Prediction": ("temporal_prediction",),
    "Social Science": ("humanities", "practical_knowledge"),
    "Natural Science": ("biology", "chemistry", "geography", "medicine", "mathematics", "physics"),
    "Logical Reasoning": ("abstract_reasoning", "rule-based_reasoning"),
    "Instruction Decomposition": ("multi-element_composition", "multi-instruction_execution"),
}
KNOWLEDGE_TYPES = {
    "Factual Knowledge": ("Attribute Perception", "Spatial Perception", "Temporal Prediction"),
    "Conceptual Knowledge": ("Social Science", "Natural Science"),
    "Procedural Knowledge": ("Logical Reasoning", "Instruction Decomposition"),
}
KP_GROUPS = ("Social Science", "Natural Science", "Logical Reasoning")
FOLDER_GROUP = {folder: group for group, folders in GROUPS.items() for folder in folders}


def _root(root: Path) -> Path:
    """The folder holding the task folders: `root` itself or its `KRIS_Bench/`."""
    return root / "KRIS_Bench" if (root / "KRIS_Bench").is_dir() else root


def _name(value, where: str, field: str) -> list[str]:
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(where, "bad_field", f"{field}: expected a file name or a list of them, found {value!r}")
    return names


def load_kris(root) -> list[EvalItem]:
    """Every KRIS-Bench instance under `root`, folders in the summary script's order, ids in file order. A
    folder with an unknown name, a missing annotation.json or a malformed record raises `DataError` naming it;
    image files are checked when read."""
    base = _root(Path(root))
    present = {p.name for p in base.iterdir() if p.is_dir()} if base.is_dir() else set()
    unknown = sorted(present - FOLDER_GROUP.keys())
    if unknown:
        raise DataError(str(base), "bad_field", f"unknown task folder(s) {unknown}; KRIS-Bench has "
                        f"{sorted(FOLDER_GROUP)}")
    if not present:
        raise FileNotFoundError(f"no KRIS-Bench task folders under {base}")
    items = []
    for folder in (f for f in FOLDER_GROUP if f in present):
        ann_path = base / folder / "annotation.json"
        if not ann_path.is_file():
            raise DataError(str(ann_path), "missing", "no annotation.json in the task folder")
        try:
            records = json.loads(ann_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(str(ann_path), "bad_line", f"not JSON: {e}") from None
        if not isinstance(records, dict):
            raise DataError(str(ann_path), "bad_field", "expected an object keyed by instance id")
        group = FOLDER_GROUP[folder]
        for key, rec in records.items():
            where = f"{ann_path}: {key}"
            if not isinstance(rec, dict):
                raise DataError(where, "bad_field", "expected an object")
            instruction = rec.get("ins_en")
            if not isinstance(instruction, str) or not instruction.strip():
                raise DataError(where, "empty_instruction", f"ins_en is {instruction!r}")
            sources = [base / folder / n for n in _name(rec.get("ori_img"), where, "ori_img")]
            truth = _name(rec["gt_img"], where, "gt_img")[0] if rec.get("gt_img") else None
            items.append(EvalItem(
                id=f"{folder}/{key}", group=folder, instruction=instruction, source=sources[0],
                extra_sources=tuple(sources[1:]), truth=base / folder / truth if truth else None,
                meta={"task_group": group, "knowledge": group in KP_GROUPS,
                      "explain": rec.get("explain_en") or ""}))
    return items
