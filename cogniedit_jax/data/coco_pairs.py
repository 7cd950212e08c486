"""COCO 2017 green-mask editing pairs (paper appendix 8.2), from the official files:
`annotations/instances_{train,val}2017.json` and the image folder (`train2017/`).

For each sampled image: the instance with the largest mask area (crowd regions are skipped: they are groups,
not one object), its category name, a position word from where the mask's centroid falls in a 3 x 3 grid, the
instruction in the paper's words, and the target: the source with the mask blended in green, written as PNG
(lossless, so the mask stays exact). Masks are decoded with pycocotools (polygons, RLE and compressed RLE).
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from cogniedit_jax.data.errors import DataError, SkipLog
from cogniedit_jax.data.images import DEFAULT_MAX_PIXELS, load_rgb, probe_size
from cogniedit_jax.data.manifest import ManifestItem, collect

# Word for word from the paper (appendix 8.2); [object name] and [position] are filled in.
TEMPLATE = "Add a green segmentation mask (for object detection) to the {name} on the {position} of the image"
GREEN = np.array([0, 255, 0], dtype=np.float64)
DEFAULT_ALPHA = 0.5
_ROWS = ("top", "", "bottom")
_COLS = ("left", "", "right")


def position_word(mask: np.ndarray) -> str:
    """'top left', 'top', ..., 'center': the 3 x 3 cell holding the mask's centroid (pixel centres)."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    row = min(int(3 * (ys.mean() + 0.5) / h), 2)
    col = min(int(3 * (xs.mean() + 0.5) / w), 2)
    return " ".join(p for p in (_ROWS[row], _COLS[col]) if p) or "center"


def instance_rle(segmentation, height: int, width: int) -> dict:
    """One RLE for a COCO segmentation: polygon list, uncompressed RLE (counts list) or compressed RLE."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]  # fewer than 3 points has no area
        if not polygons:
            raise ValueError("polygon segmentation with no polygon of 3 or more points")
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        counts = segmentation["counts"]
        counts = counts.encode() if isinstance(counts, str) else counts  # JSON stores it as str
        return {"size": segmentation["size"], "counts": counts}
    raise ValueError(f"unknown segmentation format {type(segmentation).__name__}")


def green_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """`image` (uint8 HxWx3) with mask pixels blended toward pure green: round((1-a)*pixel + a*green)."""
    out = image.copy()
    m = mask.astype(bool)
    out[m] = np.rint((1.0 - alpha) * image[m] + alpha * GREEN).astype(np.uint8)
    return out


class CocoInstances:
    """The parts of an instances_*.json this builder needs, indexed by image."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path}: not a COCO annotation file ({e})") from e
        missing = [k for k in ("images", "annotations", "categories") if k not in data]
        if missing:
            raise ValueError(f"{self.path}: missing top-level keys {missing} of a COCO instances file")
        self.images = {im["id"]: im for im in data["images"]}
        self.categories = {c["id"]: c["name"] for c in data["categories"]}
        self.by_image: dict = {}
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                self.by_image.setdefault(ann["image_id"], []).append(ann)

    def largest_instance(self, image_id) -> tuple[dict, np.ndarray]:
        """(annotation, HxW bool mask) of the image's largest non-crowd instance by decoded mask area."""
        im = self.images[image_id]
        where = f"{self.path}: image {image_id} ({im['file_name']})"
        best, best_area, best_rle = None, 0, None
        for ann in self.by_image.get(image_id, []):
            try:
                rle = instance_rle(ann["segmentation"], im["height"], im["width"])
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(where, "bad_annotation", f"annotation {ann.get('id')}: {e}")
            area = int(mask_utils.area(rle))
            if area > best_area:
                best, best_area, best_rle = ann, area, rle
        if best is None:
            raise DataError(where, "no_instances", "no non-crowd instance with a non-empty mask")
        if best["category_id"] not in self.categories:
            raise DataError(where, "bad_annotation", f"annotation {best['id']}: unknown category_id "
                                                     f"{best['category_id']}")
        with warnings.catch_warnings():  # pycocotools 2.0.11's decoder trips numpy 2's copy= deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            return best, mask_utils.decode(best_rle).astype(bool)


def make_pair(coco: CocoInstances, image_id, images_dir: Path, targets_dir: Path,
              alpha: float = DEFAULT_ALPHA, max_pixels: int = DEFAULT_MAX_PIXELS) -> ManifestItem:
    """One manifest item; writes its target image to `targets_dir/<image id>.png`."""
    im = coco.images[image_id]
    source = images_dir / im["file_name"]
    size = probe_size(source, max_pixels)
    if size != (im["width"], im["height"]):
        raise DataError(str(source), "bad_annotation",
                        f"image is {size[0]}x{size[1]} but {coco.path} says {im['width']}x{im['height']}")
    ann, mask = coco.largest_instance(image_id)
    name = coco.categories[ann["category_id"]]
    position = position_word(mask)
    pixels = np.asarray(load_rgb(source, max_pixels))
    target = targets_dir / f"{int(image_id):012d}.png"
    Image.fromarray(green_overlay(pixels, mask, alpha)).save(target)
    return ManifestItem(
        id=f"coco2017:{image_id}",
        source=str(source),
        instruction=TEMPLATE.format(name=name, position=position),
        target=str(target),
        meta={"dataset": "COCO2017", "annotation_id": ann["id"], "category": name, "position": position,
              "mask_area": int(mask.sum())},
    )


def read_coco(instances_json, images_dir, targets_dir, n: int | None = None, seed: int = 0,
              alpha: float = DEFAULT_ALPHA, max_pixels: int = DEFAULT_MAX_PIXELS
              ) -> tuple[list[ManifestItem], SkipLog]:
    """Up to `n` pairs (all if None) from images sampled with `seed` (the paper uses 1k), and the skip log."""
    coco = CocoInstances(instances_json)
    images_dir, targets_dir = Path(images_dir), Path(targets_dir)
    targets_dir.mkdir(parents=True, exist_ok=True)
    ids = sorted(i for i in coco.images if i in coco.by_image)
    random.Random(seed).shuffle(ids)
    skips = SkipLog()
    items = collect(ids, lambda i: make_pair(coco, i, images_dir, targets_dir, alpha, max_pixels), n, skips)
    return items, skips
