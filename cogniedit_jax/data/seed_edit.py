"""SEED-Data-Edit part 2 ("real editing": Photoshop requests from the web, 52k pairs) in its published layout,
the Hugging Face data set AILab-CVC/SEED-Data-Edit-Part2-3:

    SEED-Data-Edit-Part2-3/real_editing/annotations/split_0001.jsonl ... split_0006.jsonl
    SEED-Data-Edit-Part2-3/real_editing/images/          (images.tar.gz unpacked here: tar -xzf images.tar.gz)

Each annotation line is SEED-Data-Edit's single-turn record {"source_image": REL, "target_image": REL,
"instruction": TEXT} (the format its maintainers give for SEED-X's single-turn edit loader; DanceGRPO's
Qwen-Image-Edit recipe reads source_image and instruction from these files), image paths relative to
real_editing/images. A row without those keys is reported with the keys it has. Part 3 (multi_turn_editing:
source_image / instruction_N / edit_image_N) is not read: the paper samples part 2 only.

The paper samples 3k pairs (appendix 8.2): `read_seed_edit(root, n=3000, seed=S)` shuffles the valid
annotation lines with `seed` and keeps the first n whose two images exist and have sane headers.
"""

from __future__ import annotations

import random
from pathlib import Path

from cogniedit_jax.data.errors import DataError, SkipLog
from cogniedit_jax.data.images import DEFAULT_MAX_PIXELS
from cogniedit_jax.data.manifest import ManifestItem, check_text, collect, iter_jsonl, probe_item

ANNOTATIONS = "annotations/split_*.jsonl"
KEYS = ("source_image", "target_image", "instruction")


def _real_editing_dir(root: Path) -> Path:
    """Accept the data set's root or its real_editing folder."""
    for d in (root / "real_editing", root):
        if (d / "annotations").is_dir():
            return d
    raise FileNotFoundError(f"{root}: no real_editing/annotations folder (expected the layout of "
                            f"AILab-CVC/SEED-Data-Edit-Part2-3)")


def _item(where: str, obj, images: Path) -> ManifestItem:
    if not isinstance(obj, dict):
        raise DataError(where, "bad_line", f"expected a JSON object, found {type(obj).__name__}")
    missing = [k for k in KEYS if k not in obj]
    if missing:
        raise DataError(where, "bad_field", f"missing fields {missing}; found {sorted(obj)}")
    for k in KEYS[:2]:
        if not isinstance(obj[k], str) or not obj[k]:
            raise DataError(where, "bad_field", f"field {k!r} must be a non-empty path, found {obj[k]!r}")
    file, line = where.rsplit(":", 1)
    return ManifestItem(
        id=f"seed2:{Path(file).stem}:{line}",
        source=str(images / obj["source_image"]),
        instruction=check_text(obj["instruction"], where, "instruction"),
        target=str(images / obj["target_image"]),
        meta={"dataset": "SEED-Data-Edit-Part2", "annotation": f"{Path(file).name}:{line}"},
    )


def read_seed_edit(root, n: int | None = None, seed: int = 0, images=None,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[ManifestItem], SkipLog]:
    """Up to `n` pairs (all if None) sampled with `seed`, and the log of what was skipped and why.
    `images` overrides the image folder (default real_editing/images)."""
    base = _real_editing_dir(Path(root))
    images = Path(images) if images is not None else base / "images"
    files = sorted(base.glob(ANNOTATIONS))
    if not files:
        raise FileNotFoundError(f"{base}: no annotation files matching {ANNOTATIONS}")
    skips = SkipLog()
    items = []
    for path in files:
        for where, obj in iter_jsonl(path, skips):
            try:
                items.append(_item(where, obj, images))
            except DataError as err:
                skips.add(err)
    random.Random(seed).shuffle(items)
    return collect(items, lambda it: probe_item(it, max_pixels), n, skips), skips
