"""Random diffusers reference models for the side-by-side benchmarks and the parity tests (needs torch)."""

from __future__ import annotations

import contextlib
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


def edit_pipeline(transformer, vae, scheduler_cfg=None):
    """diffusers' `QwenImageEditPipeline` around `transformer` and `vae` with our scheduler config (the real
    one by default) and no text encoder: callers pass prompt embeddings."""
    import dataclasses

    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    from cogniedit_jax.sampling.schedule import SchedulerConfig

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        dataclasses.asdict(scheduler_cfg or SchedulerConfig())
    )
    pipe = QwenImageEditPipeline(scheduler, vae, None, None, None, transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def source_area(pixels: int):
    """Make the edit pipeline resize its source image to about `pixels` instead of one megapixel (small
    reference runs); everything else in its code path is unchanged."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

    original = module.calculate_dimensions
    module.calculate_dimensions = lambda area, ratio: original(pixels, ratio)
    try:
        yield
    finally:
        module.calculate_dimensions = original


@contextlib.contextmanager
def recorded_source_latents(transformer, target_tokens: int):
    """Record, from the first transformer call inside the block, the packed source latents the pipeline
    appended after the `target_tokens` noisy target tokens, and the `img_shapes` it passed."""
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("source", kwargs["hidden_states"][:, target_tokens:].clone())
        seen.setdefault("img_shapes", kwargs["img_shapes"])

    hook = transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()
