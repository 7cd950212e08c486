"""Qwen-Image's VAE (diffusers' `AutoencoderKLQwenImage`) for single images, as pure functions.

For one frame the causal video VAE is a 2D network (see `vae_mapping`), run here on NHWC arrays; the public
functions take and return NCHW like diffusers, without its frame axis: images [B, 3, H, W] in [-1, 1],
latents [B, z_dim, H/8, W/8] (diffusers' [B, z, 1, h, w] with the frame axis dropped).

Precision: activations and convolutions in `cfg.dtype`; RMS-norm statistics and the attention softmax in
fp32, as diffusers does for bf16.

Memory: with `cfg.use_tiling` large images run as diffusers' overlapping tiles, one tile at a time; the
mid-block's single-head attention over all latent positions takes its queries `cfg.attention_query_chunk`
at a time.
"""

from __future__ import annotations

import collections
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from cogniedit_jax.models.config import at_least_f32
from cogniedit_jax.models.loading import CONFIG_NAME, PARAMS_NAME, check_tensors
from cogniedit_jax.models.vae_mapping import (VAE_FOLDER, VAEConfig, decoder_blocks, encoder_layers,
                                              param_tensors)

_NORM_EPS = 1e-12  # F.normalize's default: the norm is clamped below at eps, not added to
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance


# --- layers (NHWC) -----------------------------------------------------------------------------------------


def _conv(p, x, stride: int = 1, padding=None):
    kernel = p["kernel"].astype(x.dtype)
    if padding is None:
        padding = [(kernel.shape[0] // 2,) * 2, (kernel.shape[1] // 2,) * 2]
    y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"].astype(x.dtype)


def _rms_norm(p, x):
    """diffusers' `F.normalize(x, dim=channels) * sqrt(dim) * gamma` with the statistics in (at least) fp32."""
    wide = x.astype(at_least_f32(x))
    norm = jnp.sqrt(jnp.sum(jnp.square(wide), axis=-1, keepdims=True))
    normalized = (wide / jnp.maximum(norm, _NORM_EPS)).astype(x.dtype)
    return normalized * math.sqrt(x.shape[-1]) * p["scale"].astype(x.dtype)


def _resnet(p, x):
    shortcut = _conv(p["conv_shortcut"], x) if "conv_shortcut" in p else x
    x = _conv(p["conv1"], jax.nn.silu(_rms_norm(p["norm1"], x)))
    x = _conv(p["conv2"], jax.nn.silu(_rms_norm(p["norm2"], x)))
    return x + shortcut


def _attention(p, x, query_chunk: int):
    """Single-head self-attention over all H*W positions."""
    b, h, w, c = x.shape
    qkv = _conv(p["to_qkv"], _rms_norm(p["norm"], x)).reshape(b, h * w, 1, 3 * c)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    return x + _conv(p["proj"], _query_chunked_attention(q, k, v, query_chunk).reshape(b, h, w, c))


def _query_chunked_attention(q, k, v, chunk: int):
    """Attention with the queries taken `chunk` at a time (`lax.map`). A 1024^2 image has 16384 latent
    positions, whose [T, T] fp32 scores take 1 GiB per image; a chunk holds chunk x T of them. Query rows
    are independent, so chunking (and padding the last chunk) changes nothing but memory."""
    b, t, heads, c = q.shape
    if t <= chunk:
        return jax.nn.dot_product_attention(q, k, v)
    n = -(-t // chunk)
    q = jnp.pad(q, ((0, 0), (0, n * chunk - t), (0, 0), (0, 0)))
    chunks = jnp.moveaxis(q.reshape(b, n, chunk, heads, c), 1, 0)
    out = jax.lax.map(lambda qc: jax.nn.dot_product_attention(qc, k, v), chunks)
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, heads, c)[:, :t]


def _downsample(p, x):
    # diffusers zero-pads right and bottom by one, then convolves 3x3 with stride 2 and no padding.
    return _conv(p["resample"], x, stride=2, padding=[(0, 1), (0, 1)])


def _upsample(p, x):
    # "nearest-exact" at scale 2 repeats every pixel 2x2.
    return _conv(p["resample"], jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def _mid_block(cfg: VAEConfig, p, x):
    x = _resnet(p["resnets"]["0"], x)
    return _resnet(p["resnets"]["1"], _attention(p["attentions"]["0"], x, cfg.attention_query_chunk))


def _head(p, x):
    return _conv(p["conv_out"], jax.nn.silu(_rms_norm(p["norm_out"], x)))


_ENCODER_LAYERS = {"resnet": _resnet, "downsample": _downsample}


def _encoder(cfg: VAEConfig, params, x):
    """NHWC image tile -> the posterior's moments [mean, logvar] on the channel axis."""
    p = params["encoder"]
    x = _conv(p["conv_in"], x)
    for i, layer in enumerate(encoder_layers(cfg)):
        x = _ENCODER_LAYERS[layer.kind](p["down_blocks"][str(i)], x)
    return _conv(params["quant_conv"], _head(p, _mid_block(cfg, p["mid_block"], x)))


def _decoder(cfg: VAEConfig, params, z):
    p = params["decoder"]
    x = _mid_block(cfg, p["mid_block"], _conv(p["conv_in"], _conv(params["post_quant_conv"], z)))
    for i, block in enumerate(decoder_blocks(cfg)):
        bp = p["up_blocks"][str(i)]
        for r in range(cfg.num_res_blocks + 1):
            x = _resnet(bp["resnets"][str(r)], x)
        if block.upsample:
            x = _upsample(bp["upsamplers"]["0"], x)
    return _head(p, x)


# --- tiling ------------------------------------------------------------------------------------------------


def _blend(a, b, extent: int, axis: int):
    """diffusers' blend_v/blend_h: b's first `extent` rows (columns) fade in linearly over a's last ones."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    ramp = np.arange(extent) / extent  # in float64 and then rounded, as diffusers' Python-float weights are
    w_b = jnp.asarray(ramp.reshape(shape), b.dtype)
    w_a = jnp.asarray((1 - ramp).reshape(shape), b.dtype)
    head = (jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis) * w_a
            + jax.lax.slice_in_dim(b, 0, extent, axis=axis) * w_b)
    return jnp.concatenate([head, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


def _tiled(fn, x, tile, stride, out_tile, out_stride, out_size):
    """diffusers' tiled_encode/tiled_decode over NHWC `x`: tiles of `tile` every `stride` (H, W), each mapped
    by `fn` to a tile of `out_tile`, blended over `out_tile - out_stride` with the (already blended) tiles
    above and to the left, cropped to `out_stride` and assembled into `out_size`.

    Tiles of one shape run in a `lax.map`, one after another: peak memory is one tile's activations (at
    most four shapes: inner, right edge, bottom edge, corner)."""
    starts_h, starts_w = range(0, x.shape[1], stride[0]), range(0, x.shape[2], stride[1])
    groups = collections.defaultdict(list)
    for a, i in enumerate(starts_h):
        for b, j in enumerate(starts_w):
            groups[min(tile[0], x.shape[1] - i), min(tile[1], x.shape[2] - j)].append((a, b))
    done = {}
    for (th, tw), where in groups.items():
        tiles = jnp.stack([x[:, starts_h[a]:starts_h[a] + th, starts_w[b]:starts_w[b] + tw] for a, b in where])
        out = jax.lax.map(fn, tiles)
        done.update({ab: out[n] for n, ab in enumerate(where)})
    rows = []
    for a in range(len(starts_h)):
        row = []
        for b in range(len(starts_w)):
            t = done[a, b]
            if a:
                t = _blend(done[a - 1, b], t, out_tile[0] - out_stride[0], axis=1)
            if b:
                t = _blend(done[a, b - 1], t, out_tile[1] - out_stride[1], axis=2)
            done[a, b] = t
            row.append(t[:, :out_stride[0], :out_stride[1]])
        rows.append(jnp.concatenate(row, axis=2))
    return jnp.concatenate(rows, axis=1)[:, :out_size[0], :out_size[1]]


def _apply(cfg: VAEConfig, network, params, array, encoding: bool):
    """NCHW `array` -> `network`'s NHWC output, in tiles as diffusers cuts them where tiling is on and the
    input is larger than one tile (tile sizes are set in pixels; the decoder's input tiles are latents)."""
    x = jnp.transpose(array, (0, 2, 3, 1)).astype(cfg.compute_dtype)
    fn = functools.partial(network, cfg, params)
    r = cfg.spatial_compression_ratio
    sample = ((cfg.tile_sample_min_height, cfg.tile_sample_min_width),
              (cfg.tile_sample_stride_height, cfg.tile_sample_stride_width))
    latent = tuple(tuple(v // r for v in pair) for pair in sample)
    (tile, stride), (out_tile, out_stride) = (sample, latent) if encoding else (latent, sample)
    if not cfg.use_tiling or (x.shape[1] <= tile[0] and x.shape[2] <= tile[1]):
        return fn(x)
    out_size = tuple(s // r if encoding else s * r for s in x.shape[1:3])
    return _tiled(fn, x, tile, stride, out_tile, out_stride, out_size)


# --- the public functions (NCHW) ---------------------------------------------------------------------------


def _check_channels(array, expected: int, what: str, field: str):
    if array.ndim != 4 or array.shape[1] != expected:
        raise ValueError(f"{what} must be NCHW [B, {expected}, H, W] ({field}={expected}), got "
                         f"{tuple(array.shape)}")


def _moments(cfg: VAEConfig, params, images):
    """-> (mean, logvar), NHWC."""
    _check_channels(images, cfg.input_channels, "images", "input_channels")
    return jnp.split(_apply(cfg, _encoder, params, images, encoding=True), 2, axis=-1)


def _nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


@functools.partial(jax.jit, static_argnums=0)
def vae_encode(cfg: VAEConfig, params, images):
    """Images [B, C, H, W] in [-1, 1] -> the latent distribution's mean [B, z_dim, H/8, W/8], un-normalised:
    diffusers' `encode(x).latent_dist.mean` (`.mode()`, what the edit pipeline uses) without the frame axis."""
    return _nchw(_moments(cfg, params, images)[0])


@functools.partial(jax.jit, static_argnums=0)
def vae_encode_sample(cfg: VAEConfig, params, images, key):
    """A sample of the latent distribution: mean + exp(logvar / 2) * noise, where
    noise = `jax.random.normal(key, mean.shape)` ([B, z_dim, h, w], in cfg.dtype)."""
    mean, logvar = map(_nchw, _moments(cfg, params, images))
    std = jnp.exp(0.5 * jnp.clip(logvar, *_LOGVAR_RANGE))
    return mean + std * jax.random.normal(key, mean.shape, mean.dtype)


@functools.partial(jax.jit, static_argnums=0)
def vae_decode(cfg: VAEConfig, params, latents):
    """Un-normalised latents [B, z_dim, h, w] -> images [B, C, 8h, 8w] clamped to [-1, 1] (diffusers'
    `decode(z).sample` without the frame axis; diffusers' tiled decode skips the clamp, ours does not)."""
    _check_channels(latents, cfg.z_dim, "latents", "z_dim")
    return _nchw(jnp.clip(_apply(cfg, _decoder, params, latents, encoding=False), -1.0, 1.0))


def _latent_stats(cfg: VAEConfig, latents):
    """latents_mean and latents_std shaped to broadcast over channel axis 1 (NCHW or [B, C, T, H, W])."""
    shape = (cfg.z_dim,) + (1,) * (latents.ndim - 2)
    return (np.asarray(cfg.latents_mean, np.float32).reshape(shape),
            np.asarray(cfg.latents_std, np.float32).reshape(shape))


def normalize_latents(cfg: VAEConfig, latents):
    """The edit pipeline's `(z - latents_mean) / latents_std` on encoded images (the MMDiT's latent space)."""
    mean, std = _latent_stats(cfg, latents)
    return (latents - mean.astype(latents.dtype)) / std.astype(latents.dtype)


def denormalize_latents(cfg: VAEConfig, latents):
    """The pipeline's inverse before decoding, written as it writes it: `z / (1 / latents_std) + mean`."""
    mean, std = _latent_stats(cfg, latents)
    return latents / (1.0 / std).astype(latents.dtype) + mean.astype(latents.dtype)


# --- loading -----------------------------------------------------------------------------------------------


def load_vae(path, **runtime) -> tuple[VAEConfig, dict]:
    """A folder written by `convert/qwen_image_edit.py --vae` (DST or DST/vae) -> (VAEConfig, params).
    `runtime` overrides run settings (dtype, use_tiling, tile_sample_*); params are cast to `cfg.dtype`."""
    path = Path(path)
    folder = path / VAE_FOLDER if (path / VAE_FOLDER / CONFIG_NAME).is_file() else path
    for name in (CONFIG_NAME, PARAMS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: is {path} a folder written by "
                                    "convert/qwen_image_edit.py --vae?")
    cfg = VAEConfig.from_json(folder / CONFIG_NAME, **runtime)
    plan = param_tensors(cfg)
    file = folder / PARAMS_NAME
    with safe_open(file, "numpy") as f:
        check_tensors({t.ours: t.shape for t in plan}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()},
                      str(file))
        # 127M parameters: the whole VAE fits in host memory at once.
        flat = {t.ours: jnp.asarray(f.get_tensor(t.ours), cfg.compute_dtype) for t in plan}
    return cfg, traverse_util.unflatten_dict(flat, sep="/")
