"""Resolution buckets: Qwen-Image-Edit edits at about one megapixel with the source's aspect ratio.

`edit_dimensions` is `calculate_dimensions(1024 * 1024, w / h)` of diffusers 0.42's pipeline_qwenimage_edit.py
(Python's `round`, i.e. half to even, on width/32 and height/32); the pipeline then floors both sides to a
multiple of 16 (VAE factor 8 x patch 2), which a multiple of 32 already is. `resize_to` is the pipeline's
`VaeImageProcessor.resize` for PIL input: Lanczos, no reducing gap. Every image of a bucket has the same
(height, width), so a batch of one bucket stacks into one array.
"""

from __future__ import annotations

import math

from PIL import Image

TARGET_AREA = 1024 * 1024
SIDE_MULTIPLE = 32


def edit_dimensions(width: int, height: int, target_area: int = TARGET_AREA) -> tuple[int, int]:
    """(width, height) the edit pipeline works at for a `width` x `height` source."""
    ratio = width / height
    w = math.sqrt(target_area * ratio)
    h = w / ratio
    w = round(w / SIDE_MULTIPLE) * SIDE_MULTIPLE
    h = round(h / SIDE_MULTIPLE) * SIDE_MULTIPLE
    if w == 0 or h == 0:
        raise ValueError(f"aspect ratio of {width}x{height} is too extreme: the edit size would be {w}x{h}")
    return w, h


def resize_to(img: Image.Image, width: int, height: int) -> Image.Image:
    return img.resize((width, height), resample=Image.LANCZOS, reducing_gap=None)
