"""Benchmark folders in the published layouts, a stand-in editor and a rule chat that answers the benchmarks'
judge prompts by rule (shared by the tests/test_eval_*.py files and used by the CLI test as plugins)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from cogniedit_jax.data import shapes
from cogniedit_jax.eval.items import png_bytes


def image(seed: int, hw=(24, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


GEDIT_ROWS = [  # (key, task_type, language, intersection, instruction)
    ("k1", "background_change", "en", True, "make the sky pink"),
    ("k2", "background_change", "en", False, "put the cat on a beach"),
    ("k3", "color_alter", "en", True, "make the car blue"),
    ("k1", "background_change", "cn", True, "把天空变成粉色"),
    ("k4", "text_change", "en", False, "xyzzy: write HELLO"),
]


def write_gedit_parquet(root: Path, rows=GEDIT_ROWS) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    cols = {"task_type": [], "key": [], "instruction": [], "instruction_language": [], "input_image": [],
            "input_image_raw": [], "Intersection_exist": []}
    for i, (key, task, lang, inter, text) in enumerate(rows):
        cols["task_type"].append(task)
        cols["key"].append(key)
        cols["instruction"].append(text)
        cols["instruction_language"].append(lang)
        cols["input_image"].append({"bytes": png_bytes(image(i, (16, 16))), "path": None})
        cols["input_image_raw"].append({"bytes": png_bytes(image(i, (24 + 8 * (i % 2), 32))), "path": None})
        cols["Intersection_exist"].append(inter)
    path = root / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


KRIS_ANNOTATIONS = {
    "humanities": {"1": {"ori_img": "1.jpg", "ins_en": "dress him as a samurai", "explain_en": "armour"},
                   "2": {"ori_img": "2.png", "ins_en": "xyzzy: the flag of Japan", "explain_en": "red disc"}},
    "color_change": {"1": {"ori_img": "1.jpg", "ins_en": "make the apple green", "explain_en": ""}},
    "viewpoint_change": {"1": {"ori_img": "1.jpg", "gt_img": "1_gt.jpg", "ins_en": "draw the top view",
                               "explain_en": ""}},
    "temporal_prediction": {"1": {"ori_img": ["1-1.jpg", "1-2.jpg", "1-3.jpg"], "gt_img": "1-4.jpg",
                                  "ins_en": "predict frame 4", "explain_en": ""}},
}


def write_kris(root: Path, annotations=KRIS_ANNOTATIONS) -> Path:
    base = root / "KRIS_Bench"
    seed = 100
    for folder, records in annotations.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        (base / folder / "annotation.json").write_text(json.dumps(records, ensure_ascii=False))
        for rec in records.values():
            names = rec["ori_img"] if isinstance(rec["ori_img"], list) else [rec["ori_img"]]
            for name in names + ([rec["gt_img"]] if rec.get("gt_img") else []):
                seed += 1
                Image.fromarray(image(seed, (20, 28))).save(base / folder / name)
    return base


def invert_edit(images, instructions):
    """The stand-in editor: the colour negative of each (bucket-sized) source."""
    assert len(images) == len(instructions)
    return 255 - np.asarray(images)


def invert_editor(config, lora, args):
    """CLI plugin form (`--editor tests.eval_fixtures:invert_editor`)."""
    return invert_edit


def oracle_shapes_editor(config, lora, args):
    """CLI plugin: paints the shapes world's exact outcome of each instruction (the judge must call it exact)."""
    def edit(images, instructions):
        return np.stack([shapes.render(shapes.outcomes(shapes.perceive(im)[0], shapes.parse_instruction(t))[0])
                         for im, t in zip(images, instructions, strict=True)])
    return edit


def rule_chat(turns, attempt):
    """Answers the benchmarks' judge prompts by rule: scores from the mean of the last image; an instruction
    containing "xyzzy" gets prose without any score (the item must end up failed, not scored)."""
    answers = []
    for turn in turns:
        prompt = next(p["text"] for p in turn if "text" in p and len(p["text"]) > 200)
        last = [p["image"] for p in turn if "image" in p][-1]
        level = float(np.asarray(last).mean()) / 255
        if "xyzzy" in prompt:
            answers.append("Step 1: I looked at the images. They are nice.")
        elif "overediting" in prompt:  # GEdit SC
            answers.append(f'```json\n{{"score": [{round(10 * level)}, 7], "reasoning": "ok"}}\n```')
        elif "naturalness" in prompt:  # GEdit PQ
            answers.append('{"score" : [8, 6], "reasoning" : "fine"}')
        else:
            keys = [k for k in ("consistency", "quality", "instruction", "knowledge") if f"{k}_score" in prompt]
            answers.append("Reasoning first.\n{" + ", ".join(f'"{k}_score": {1 + round(4 * level) if k != "knowledge" else 2}'
                                                            for k in keys) + "}")
    return answers
