"""Qwen-Image-Edit's models in JAX: the MMDiT, its LoRA, loading of converted weights."""

from cogniedit_jax.models.config import MMDiTConfig
from cogniedit_jax.models.loading import load_transformer
from cogniedit_jax.models.mmdit import init_params, transformer_forward

__all__ = ["MMDiTConfig", "init_params", "load_transformer", "transformer_forward"]
