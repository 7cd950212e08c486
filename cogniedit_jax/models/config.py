"""The MMDiT's configuration: the diffusers architecture fields plus how we run it."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "cudnn")
# float64 is for finite-difference gradient tests on CPU (needs jax_enable_x64).
DTYPES = ("float32", "bfloat16", "float64")



def at_least_f32(x):
    """x's dtype widened to at least fp32: where norms, softmax, RoPE and the sampler's step arithmetic run
    (fp32 for bf16/fp32 models, fp64 in fp64 tests)."""
    return jnp.promote_types(x.dtype, jnp.float32)


# diffusers config keys that carry no architecture (bookkeeping written by save_pretrained).
_DIFFUSERS_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """Architecture fields keep diffusers' `QwenImageTransformer2DModel` names and defaults (the real model).

    Frozen and hashable: it is a static argument of every jitted function that takes it.
    """

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False
    # How we run it (not in diffusers' config).
    dtype: str = "float32"
    remat_policy: str = "full"
    attention_impl: str = "xla"
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self):
        errors = []
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            errors.append(
                f"axes_dims_rope {tuple(self.axes_dims_rope)} must sum to attention_head_dim "
                f"{self.attention_head_dim}")
        if any(d % 2 for d in self.axes_dims_rope):
            errors.append(f"axes_dims_rope {tuple(self.axes_dims_rope)}: every axis must be even")
        for name, value, allowed in (("dtype", self.dtype, DTYPES),
                                     ("remat_policy", self.remat_policy, REMAT_POLICIES),
                                     ("attention_impl", self.attention_impl, ATTENTION_IMPLS)):
            if value not in allowed:
                errors.append(f"{name}={value!r}: expected one of {allowed}")
        if errors:
            raise ValueError("MMDiTConfig: " + "; ".join(errors))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_features(self) -> int:
        return self.patch_size * self.patch_size * self.out_channels

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], **runtime) -> "MMDiTConfig":
        """From a diffusers `transformer/config.json` dict; fields we cannot honour are refused by name."""
        config = {k: v for k, v in config.items() if k not in _DIFFUSERS_BOOKKEEPING}
        if config.pop("guidance_embeds", False):
            # diffusers' QwenTimestepProjEmbeddings has no guidance input: such a model cannot run there either.
            raise ValueError("transformer config field guidance_embeds=True is unsupported "
                             "(diffusers' Qwen-Image timestep embedding takes no guidance)")
        arch = {f.name for f in dataclasses.fields(cls)} - {"dtype", "remat_policy", "attention_impl",
                                                              "rope_theta", "eps"}
        ignored = sorted(set(config) - arch)
        if ignored:
            # diffusers drops keys its __init__ does not take (the released Qwen-Image config carries
            # `pooled_projection_dim`); so do we, loudly.
            warnings.warn(f"transformer config fields ignored (diffusers ignores them too): {ignored}")
            config = {k: v for k, v in config.items() if k in arch}
        if "out_channels" in config and config["out_channels"] is None:  # diffusers: None means in_channels
            config["out_channels"] = config.get("in_channels", cls.in_channels)
        if "axes_dims_rope" in config:
            config["axes_dims_rope"] = tuple(config["axes_dims_rope"])
        return cls(**config, **runtime)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config dict describing the same architecture."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("dtype", "remat_policy", "attention_impl", "rope_theta", "eps")}
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        out["guidance_embeds"] = False
        return out

    def replace(self, **changes) -> "MMDiTConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self, path: Path) -> None:
        fields = dataclasses.asdict(self)
        fields["axes_dims_rope"] = list(self.axes_dims_rope)
        Path(path).write_text(json.dumps(fields, indent=2) + "\n")

    @classmethod
    def from_json(cls, path: Path, **overrides) -> "MMDiTConfig":
        fields = json.loads(Path(path).read_text())
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown MMDiTConfig fields {unknown}")
        fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
        fields.update(overrides)
        return cls(**fields)
