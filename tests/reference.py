"""Tiny random diffusers reference models and matching inputs, shared by the parity tests and benchmarks."""

from __future__ import annotations

import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (no zero bias or unit norm left to hide a bug), at a scale that keeps
    activations O(1) through the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / np.sqrt(p.shape[-1]))
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return module


def tiny_transformer(seed: int = 0, **config):
    from diffusers import QwenImageTransformer2DModel

    defaults = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                    num_attention_heads=3, joint_attention_dim=24, axes_dims_rope=(4, 8, 4))
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**{**defaults, **config})
    return randomize_(model, seed).eval()


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
