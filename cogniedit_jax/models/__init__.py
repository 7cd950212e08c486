"""Qwen-Image-Edit's models in JAX: the MMDiT, its LoRA, loading of converted weights."""

from cogniedit_jax.models.config import MMDiTConfig
from cogniedit_jax.models.loading import load_transformer
from cogniedit_jax.models.mmdit import init_params, transformer_forward
from cogniedit_jax.models.vae import load_vae, vae_decode, vae_encode
from cogniedit_jax.models.vae_mapping import VAEConfig

__all__ = ["MMDiTConfig", "VAEConfig", "init_params", "load_transformer", "load_vae", "transformer_forward",
           "vae_decode", "vae_encode"]
