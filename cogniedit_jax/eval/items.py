"""One benchmark item, whatever the benchmark: an id, its group (GEdit-Bench task type, KRIS-Bench folder), the
instruction, the source image (a file, or encoded bytes from a parquet row) and what its judge needs."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cogniedit_jax.data.errors import DataError
from cogniedit_jax.data.images import load_rgb, to_rgb


@dataclasses.dataclass(frozen=True)
class EvalItem:
    id: str  # unique in the benchmark; also the relative path of its output files
    group: str
    instruction: str
    source: Path | bytes
    judge_source: Path | bytes | None = None  # the image the judge compares against, when not `source`
    extra_sources: tuple = ()  # more input images (multi-image tasks); a one-image editor cannot run these
    truth: Path | None = None  # a reference result the judge also sees (KRIS-Bench viewpoint change)
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def file_stem(self) -> str:
        """`id` as a relative path with only [A-Za-z0-9._-] in each part."""
        return "/".join(re.sub(r"[^A-Za-z0-9._-]", "_", part) or "_" for part in self.id.split("/"))


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def load_image(src: Path | bytes, where: str = "") -> np.ndarray:
    """uint8 [H, W, 3] from a file (the data loader's checks and mode rules) or from encoded bytes."""
    if isinstance(src, bytes):
        try:
            with Image.open(io.BytesIO(src)) as img:
                img.load()
                return np.asarray(to_rgb(img))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(where or "<bytes>", "corrupt", f"embedded image is not readable: {e}") from None
    return np.asarray(load_rgb(src))
