"""Qwen-Image's multimodal RoPE: 3 axes (frame, height, width) over the images, then the text.

Facts carried over from diffusers (`QwenEmbedRope`, `QwenEmbedLayer3DRope`):
- image k of a row has frame position k; heights and widths are centred ("scale_rope"): a side of n
  patches gets positions -(n - n//2) .. n//2 - 1;
- text token j sits at position m + j on all three axes, m = the largest half side over the row's images;
- the layer-3D variant gives the last (condition) image frame position -1 and m >= number of layers;
- pairs are interleaved (x[2i], x[2i+1]) and rotated in fp32.

Positions depend only on shapes, so the tables are built on the host (numpy, fp32 as torch does) and
enter the jitted program as constants.

Unlike diffusers, which lays out every row of a batch like `img_shapes[0]`, each row gets its own layout;
for equal layouts (all diffusers supports) the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from cogniedit_jax.models.config import MMDiTConfig, at_least_f32

ImgShapes = tuple[tuple[tuple[int, int, int], ...], ...]


def normalize_img_shapes(img_shapes: Sequence[Sequence[Sequence[int]]], batch: int) -> ImgShapes:
    """`img_shapes[b] = [(frames, h, w), ...]` (target first) as nested tuples (hashable: a jit static)."""
    shapes = tuple(tuple(tuple(int(v) for v in fhw) for fhw in row) for row in img_shapes)
    if len(shapes) != batch:
        raise ValueError(f"img_shapes has {len(shapes)} rows, the batch has {batch}")
    for b, row in enumerate(shapes):
        if not row or any(len(fhw) != 3 or min(fhw) < 1 for fhw in row):
            raise ValueError(f"img_shapes[{b}] = {row}: expected a non-empty list of positive (frames, h, w)")
    return shapes


def _centred(n: int) -> np.ndarray:
    return np.arange(-(n - n // 2), n // 2, dtype=np.int64)


def _row_positions(cfg: MMDiTConfig, row, txt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer positions [tokens, 3] of one row's image tokens and text tokens."""
    img = []
    last = len(row) - 1
    for k, (f, h, w) in enumerate(row):
        if cfg.use_layer3d_rope and k == last:
            if f != 1:
                raise ValueError(f"layer-3D RoPE: the condition image must have 1 frame, found {f}")
            frames = np.array([-1])
        else:
            frames = np.arange(k, k + f)
        grid = np.stack(np.meshgrid(frames, _centred(h), _centred(w), indexing="ij"), axis=-1)
        img.append(grid.reshape(-1, 3))
    start = max(max(h // 2, w // 2) for _, h, w in row)
    if cfg.use_layer3d_rope:
        start = max(start, last)
    txt = np.repeat(np.arange(start, start + txt_len)[:, None], 3, axis=1)
    return np.concatenate(img), txt


def _angles(cfg: MMDiTConfig, positions: np.ndarray) -> np.ndarray:
    """[..., tokens, 3] integer positions -> [..., tokens, head_dim/2] fp32 angles."""
    parts = []
    for axis, dim in enumerate(cfg.axes_dims_rope):
        inv_freq = np.float32(1.0) / np.power(np.float32(cfg.rope_theta),
                                             np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        parts.append(positions[..., axis:axis + 1].astype(np.float32) * inv_freq)
    return np.concatenate(parts, axis=-1)


def rope_tables(cfg: MMDiTConfig, img_shapes: ImgShapes, txt_len: int):
    """(img (cos, sin), txt (cos, sin)), each [B or 1, tokens, head_dim/2] fp32 numpy."""
    rows = sorted(set(img_shapes), key=img_shapes.index)
    per_row = [_row_positions(cfg, row, txt_len) for row in rows]
    index = [rows.index(r) for r in img_shapes] if len(rows) > 1 else [0]
    img = _angles(cfg, np.stack([per_row[i][0] for i in index]))
    txt = _angles(cfg, np.stack([per_row[i][1] for i in index]))
    return (np.cos(img), np.sin(img)), (np.cos(txt), np.sin(txt))


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate interleaved pairs of x [B, S, H, D] by angles given as cos/sin [B or 1, S, D/2]."""
    xf = x.astype(at_least_f32(x)).reshape(*x.shape[:-1], -1, 2)
    re, im = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
