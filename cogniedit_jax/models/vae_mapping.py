"""The Qwen-Image VAE's configuration, its layer list, the table between diffusers' `AutoencoderKLQwenImage`
state dict and our parameter pytree, and the converter that applies the table.

Why the VAE is 2D here: diffusers' VAE is a causal video VAE, but for one frame every causal 3D convolution
sees two zero frames (its causal padding) and the frame itself, so only its last temporal tap `w[:, :, -1]`
ever touches data; the resampling blocks' `time_conv` layers only run from the second frame on. The
converter therefore keeps the last tap of each 3D kernel (checking the kernel's full shape) and skips the
`time_conv` tensors (checked, not written): the Flax model is a plain 2D network over images.

Our layout: nested dicts named after diffusers' modules ("encoder/down_blocks/3/conv1"), convolution
kernels as `kernel[kh, kw, in, out]` (NHWC convolutions), RMS-norm gains as `scale[dim]`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cogniedit_jax.models.config import _DIFFUSERS_BOOKKEEPING, DTYPES
from cogniedit_jax.models.conversion import (SafetensorsStreamWriter, _read, output_dtype,
                                             source_tensors)
from cogniedit_jax.models.loading import CONFIG_NAME, PARAMS_NAME, check_tensors

VAE_FOLDER = "vae"

# The released Qwen-Image VAE's per-channel latent statistics (diffusers' defaults).
_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
_RUN_FIELDS = ("dtype", "attention_query_chunk", "use_tiling", "tile_sample_min_height", "tile_sample_min_width",
               "tile_sample_stride_height", "tile_sample_stride_width")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture fields keep diffusers' names (typos included) and defaults (the real model).

    Frozen and hashable: a static argument of the jitted VAE functions. Tiling (off by default) follows
    diffusers' `enable_tiling`: images wider or taller than the tile are cut into tiles of
    `tile_sample_min_*` pixels every `tile_sample_stride_*` pixels, and the overlaps are blended.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    input_channels: int = 3
    latents_mean: tuple[float, ...] = _LATENTS_MEAN
    latents_std: tuple[float, ...] = _LATENTS_STD
    # How we run it (not in diffusers' config).
    dtype: str = "float32"
    attention_query_chunk: int = 4096  # mid-block attention: queries per step (bounds its [T, T] scores)
    use_tiling: bool = False
    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192

    def __post_init__(self):
        errors = []
        if self.attn_scales:
            # diffusers 0.42 builds attention blocks in the encoder's down blocks for these scales, then
            # calls them with arguments they do not take: no such model runs, the released one has none.
            errors.append(f"attn_scales={self.attn_scales}: only () is supported (diffusers cannot run others)")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            errors.append(f"temperal_downsample {self.temperal_downsample} must have len(dim_mult) - 1 = "
                          f"{len(self.dim_mult) - 1} entries (one per downsampling)")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                errors.append(f"{name} has {len(getattr(self, name))} entries, z_dim is {self.z_dim}")
        if self.dtype not in DTYPES:
            errors.append(f"dtype={self.dtype!r}: expected one of {DTYPES}")
        if self.attention_query_chunk < 1:
            errors.append(f"attention_query_chunk={self.attention_query_chunk}: must be >= 1")
        r = self.spatial_compression_ratio
        for axis in ("height", "width"):
            size, stride = getattr(self, f"tile_sample_min_{axis}"), getattr(self, f"tile_sample_stride_{axis}")
            if not 0 < stride <= size or size % r or stride % r:
                errors.append(f"tile_sample_min_{axis}={size}, tile_sample_stride_{axis}={stride}: need "
                              f"0 < stride <= min, both multiples of the compression ratio {r}")
        if errors:
            raise ValueError("VAEConfig: " + "; ".join(errors))

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** len(self.temperal_downsample)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], **runtime) -> "VAEConfig":
        """From a diffusers `vae/config.json` dict."""
        config = {k: v for k, v in config.items() if k not in _DIFFUSERS_BOOKKEEPING}
        config.pop("dropout", None)  # diffusers applies it in training mode only; we only run inference
        arch = {f.name for f in dataclasses.fields(cls)} - set(_RUN_FIELDS)
        ignored = sorted(set(config) - arch)
        if ignored:
            warnings.warn(f"vae config fields ignored (diffusers ignores them too): {ignored}")
        return cls(**_tuples({k: v for k, v in config.items() if k in arch}), **runtime)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config dict describing the same architecture."""
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self) if f.name not in _RUN_FIELDS
                for v in [getattr(self, f.name)]}

    def replace(self, **changes) -> "VAEConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: Path, **overrides) -> "VAEConfig":
        try:
            return cls(**{**_tuples(json.loads(Path(path).read_text())), **overrides})
        except TypeError as e:  # an unknown field, named by the message
            raise ValueError(f"{path}: {e}") from None


def _tuples(fields: dict) -> dict:
    """JSON lists back to the tuples a hashable config needs."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


# --- the architecture, as both the table and the forward pass walk it -----------------------------------


@dataclasses.dataclass(frozen=True)
class Layer:
    """One entry of the encoder's `down_blocks` or one decoder `up_blocks` entry."""

    kind: str  # encoder: "resnet" | "downsample"; decoder: "up"
    in_dim: int
    out_dim: int
    temporal: bool = False  # a diffusers "*3d" resample: carries a time_conv (unused for images)
    upsample: bool = False  # decoder blocks: ends with a 2x upsampling that halves the channels


def encoder_layers(cfg: VAEConfig) -> list[Layer]:
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    layers = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            layers.append(Layer("resnet", in_dim, out_dim))
            in_dim = out_dim
        if i != len(cfg.dim_mult) - 1:
            layers.append(Layer("downsample", out_dim, out_dim, temporal=cfg.temperal_downsample[i]))
    return layers


def decoder_blocks(cfg: VAEConfig) -> list[Layer]:
    """Each block: num_res_blocks + 1 residual blocks, then (all but the last) an upsampling."""
    dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temperal_upsample = cfg.temperal_downsample[::-1]
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(cfg.dim_mult) - 1
        blocks.append(Layer("up", in_dim // 2 if i else in_dim, out_dim, upsample=not last,
                            temporal=not last and temperal_upsample[i]))
    return blocks


def encoder_dim(cfg: VAEConfig) -> int:
    return cfg.base_dim * cfg.dim_mult[-1]


# --- the table ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One diffusers tensor and the leaf of ours made from it (`ours` None: checked, not converted)."""

    ours: str | None  # "encoder/conv_in/kernel"
    theirs: str  # "encoder.conv_in.weight"
    their_shape: tuple[int, ...]
    kind: str  # "conv3d" | "conv2d" (kernels), "norm" (gains), "copy" (biases), "unused"

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.their_shape
        if self.kind == "conv3d":  # [out, in, t, kh, kw] -> [kh, kw, in, out]
            return (s[3], s[4], s[1], s[0])
        if self.kind == "conv2d":  # [out, in, kh, kw] -> [kh, kw, in, out]
            return (s[2], s[3], s[1], s[0])
        if self.kind == "norm":  # [dim, 1, 1(, 1)] -> [dim]
            return (s[0],)
        return s

    def to_ours(self, array: np.ndarray) -> np.ndarray:
        if self.kind == "conv3d":
            array = array[:, :, -1]  # the last temporal tap: the only one a single frame reaches
        if self.kind in ("conv3d", "conv2d"):
            return array.transpose(2, 3, 1, 0)
        return array.reshape(self.shape)


def _conv(ours: str, theirs: str, in_dim: int, out_dim: int, size: int, kind: str = "conv3d") -> list[Tensor]:
    taps = (size,) if kind == "conv3d" else ()
    return [Tensor(f"{ours}/kernel", f"{theirs}.weight", (out_dim, in_dim, *taps, size, size), kind),
            Tensor(f"{ours}/bias", f"{theirs}.bias", (out_dim,), "copy")]


def _norm(ours: str, theirs: str, dim: int, images: bool = False) -> list[Tensor]:
    # diffusers' RMS norm gain is [dim, 1, 1] on image-shaped (attention) inputs, [dim, 1, 1, 1] on videos.
    return [Tensor(f"{ours}/scale", f"{theirs}.gamma", (dim, 1, 1) if images else (dim, 1, 1, 1), "norm")]


def _unused(theirs: str, in_dim: int, out_dim: int) -> list[Tensor]:
    """A (3, 1, 1) time_conv: runs only from a video's second frame on."""
    return [Tensor(None, f"{theirs}.weight", (out_dim, in_dim, 3, 1, 1), "unused"),
            Tensor(None, f"{theirs}.bias", (out_dim,), "unused")]


def _resnet(ours: str, theirs: str, in_dim: int, out_dim: int) -> list[Tensor]:
    out = [*_norm(f"{ours}/norm1", f"{theirs}.norm1", in_dim),
           *_conv(f"{ours}/conv1", f"{theirs}.conv1", in_dim, out_dim, 3),
           *_norm(f"{ours}/norm2", f"{theirs}.norm2", out_dim),
           *_conv(f"{ours}/conv2", f"{theirs}.conv2", out_dim, out_dim, 3)]
    if in_dim != out_dim:
        out += _conv(f"{ours}/conv_shortcut", f"{theirs}.conv_shortcut", in_dim, out_dim, 1)
    return out


def _attention(ours: str, theirs: str, dim: int) -> list[Tensor]:
    return [*_norm(f"{ours}/norm", f"{theirs}.norm", dim, images=True),
            *_conv(f"{ours}/to_qkv", f"{theirs}.to_qkv", dim, 3 * dim, 1, "conv2d"),
            *_conv(f"{ours}/proj", f"{theirs}.proj", dim, dim, 1, "conv2d")]


def _resample(ours: str, theirs: str, layer: Layer, out_dim: int, time_out: int) -> list[Tensor]:
    out = _conv(f"{ours}/resample", f"{theirs}.resample.1", layer.out_dim, out_dim, 3, "conv2d")
    return out + (_unused(f"{theirs}.time_conv", layer.out_dim, time_out) if layer.temporal else [])


def _mid_block(ours: str, theirs: str, dim: int) -> list[Tensor]:
    return [*_resnet(f"{ours}/resnets/0", f"{theirs}.resnets.0", dim, dim),
            *_attention(f"{ours}/attentions/0", f"{theirs}.attentions.0", dim),
            *_resnet(f"{ours}/resnets/1", f"{theirs}.resnets.1", dim, dim)]


def tensors(cfg: VAEConfig) -> list[Tensor]:
    """Every tensor of diffusers' state dict, in a fixed order; those with `ours` set are our leaves."""
    z2, top = 2 * cfg.z_dim, encoder_dim(cfg)
    out = _conv("encoder/conv_in", "encoder.conv_in", cfg.input_channels, cfg.base_dim, 3)
    for i, layer in enumerate(encoder_layers(cfg)):
        ours, theirs = f"encoder/down_blocks/{i}", f"encoder.down_blocks.{i}"
        if layer.kind == "resnet":
            out += _resnet(ours, theirs, layer.in_dim, layer.out_dim)
        else:
            out += _resample(ours, theirs, layer, layer.out_dim, layer.out_dim)
    out += [*_mid_block("encoder/mid_block", "encoder.mid_block", top),
            *_norm("encoder/norm_out", "encoder.norm_out", top),
            *_conv("encoder/conv_out", "encoder.conv_out", top, z2, 3),
            *_conv("quant_conv", "quant_conv", z2, z2, 1),
            *_conv("post_quant_conv", "post_quant_conv", cfg.z_dim, cfg.z_dim, 1),
            *_conv("decoder/conv_in", "decoder.conv_in", cfg.z_dim, top, 3),
            *_mid_block("decoder/mid_block", "decoder.mid_block", top)]
    for i, block in enumerate(decoder_blocks(cfg)):
        ours, theirs = f"decoder/up_blocks/{i}", f"decoder.up_blocks.{i}"
        for r in range(cfg.num_res_blocks + 1):
            out += _resnet(f"{ours}/resnets/{r}", f"{theirs}.resnets.{r}",
                           block.in_dim if r == 0 else block.out_dim, block.out_dim)
        if block.upsample:
            out += _resample(f"{ours}/upsamplers/0", f"{theirs}.upsamplers.0", block, block.out_dim // 2,
                             2 * block.out_dim)
    last = cfg.base_dim * cfg.dim_mult[0]
    out += [*_norm("decoder/norm_out", "decoder.norm_out", last),
            *_conv("decoder/conv_out", "decoder.conv_out", last, cfg.input_channels, 3)]
    return out


def param_tensors(cfg: VAEConfig) -> list[Tensor]:
    """Our leaves: the table without the tensors a single frame never uses."""
    return [t for t in tensors(cfg) if t.ours is not None]


# --- conversion --------------------------------------------------------------------------------------------


def convert_vae(src, dst, dtype: str | None = None, progress: bool = True) -> VAEConfig:
    """Convert the diffusers VAE folder `src` into `dst/vae/`, one tensor at a time. dtype: None keeps the
    checkpoint's."""
    src, out = Path(src), Path(dst) / VAE_FOLDER
    config_file = src / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: --vae takes a diffusers VAE folder")
    sources = source_tensors(src)
    out_dtype = output_dtype(dtype, sources)
    cfg = VAEConfig.from_diffusers(json.loads(config_file.read_text()), dtype=out_dtype.name)
    plan = tensors(cfg)
    check_tensors({t.theirs: t.their_shape for t in plan}, {k: s.shape for k, s in sources.items()},
                  str(src))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (PARAMS_NAME + ".partial")
    writer = SafetensorsStreamWriter(tmp, {t.ours: (t.shape, out_dtype) for t in plan if t.ours},
                                     metadata={"format": "cogniedit_jax", "source": str(src)})
    try:
        for t in tqdm(plan, desc="convert vae", unit="tensor", disable=not progress):
            if t.ours:
                writer.write(t.ours, t.to_ours(_read(sources[t.theirs], t.theirs)).astype(out_dtype))
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out / PARAMS_NAME)
    cfg.to_json(out / CONFIG_NAME)
    return cfg
