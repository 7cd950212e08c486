"""Tiny random diffusers reference models and matching inputs, shared by the parity tests and benchmarks."""

from __future__ import annotations

import torch

from cogniedit_jax.bench.reference import random_diffusers_transformer


def tiny_transformer(seed: int = 0, **config):
    defaults = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                    num_attention_heads=3, joint_attention_dim=24, axes_dims_rope=(4, 8, 4))
    return random_diffusers_transformer(seed, **{**defaults, **config})


def transformer_inputs(model, img_shapes, valid_lengths, txt_len, seed=0):
    """Packed latents, text states, a padded mask (row b keeps valid_lengths[b] tokens), per-row sigmas."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    batch = len(valid_lengths)
    seq = sum(f * h * w for f, h, w in img_shapes)
    mask = torch.zeros(batch, txt_len, dtype=torch.long)
    for b, n in enumerate(valid_lengths):
        mask[b, :n] = 1
    return dict(
        hidden_states=torch.randn(batch, seq, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, txt_len, cfg.joint_attention_dim, generator=g),
        encoder_hidden_states_mask=mask,
        timestep=torch.linspace(0.9, 0.2, batch),
        img_shapes=[list(img_shapes)] * batch,
    )


def to_jax_inputs(inputs: dict) -> dict:
    import jax.numpy as jnp

    return {k: jnp.asarray(v.numpy()) if torch.is_tensor(v) else v for k, v in inputs.items()}


def convert_and_load(model, tmp_path, dtype=None, **runtime):
    """The user's path for a real checkpoint: save_pretrained -> converter -> load_transformer."""
    from cogniedit_jax.models import load_transformer
    from cogniedit_jax.models.conversion import convert_transformer

    model.save_pretrained(tmp_path / "diffusers")
    convert_transformer(tmp_path / "diffusers", tmp_path / "converted", dtype=dtype, progress=False)
    return load_transformer(tmp_path / "converted", **runtime)
