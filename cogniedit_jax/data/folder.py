"""A user's own pairs in a plain folder:

    DIR/NAME.txt             the instruction (UTF-8)
    DIR/NAME.<ext>           the source image (ext: png, jpg, jpeg, webp, bmp, tif, tiff)
    DIR/NAME_target.<ext>    optional: the reference edit

Sub-folders are searched too; an item's id is NAME's path relative to DIR.
"""

from __future__ import annotations

from pathlib import Path

from cogniedit_jax.data.errors import DataError, SkipLog
from cogniedit_jax.data.images import DEFAULT_MAX_PIXELS
from cogniedit_jax.data.manifest import ManifestItem, check_text, collect, probe_item

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
TARGET_SUFFIX = "_target"


def _find_image(stem: Path) -> Path | None:
    found = [stem.with_name(stem.name + ext) for ext in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS)]
    found = [p for p in found if p.is_file()]
    return found[0] if found else None


def _item(root: Path, txt: Path, max_pixels: int) -> ManifestItem:
    try:
        text = txt.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(str(txt), "bad_text", f"instruction is not valid UTF-8 (byte at offset {e.start})")
    stem = txt.with_suffix("")
    source = _find_image(stem)
    if source is None:
        exts = ",".join(IMAGE_EXTS)
        raise DataError(str(txt), "missing", f"no source image {stem.name}{{{exts}}} beside it")
    target = _find_image(stem.with_name(stem.name + TARGET_SUFFIX))
    item = ManifestItem(
        id=str(stem.relative_to(root)),
        source=str(source),
        instruction=check_text(text, str(txt), "instruction"),
        target=None if target is None else str(target),
    )
    return probe_item(item, max_pixels)


def read_folder(root, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[ManifestItem], SkipLog]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    skips = SkipLog()
    items = collect(sorted(root.rglob("*.txt")), lambda t: _item(root, t, max_pixels), None, skips)
    return items, skips
