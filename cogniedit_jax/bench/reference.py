"""Random diffusers reference models for the side-by-side benchmarks and the parity tests (needs torch)."""

from __future__ import annotations

import math


def randomize_(module, seed: int):
    """Every parameter random (no zero bias or unit norm left to hide a bug), at a scale that keeps
    activations O(1) through the network."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p.shape[-1]))
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return module


def random_diffusers_transformer(seed: int, **config):
    """A diffusers `QwenImageTransformer2DModel(**config)` with every parameter random, in eval mode."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return randomize_(QwenImageTransformer2DModel(**config), seed).eval()
