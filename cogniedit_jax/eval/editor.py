"""The editor the CLI runs: a converted Qwen-Image-Edit (the trainer's `load_editor`: transformer + VAE from
convert/qwen_image_edit.py's folder), optionally with a trained LoRA, conditioned through the sidecar's
encoder, as QwenImageEditPipeline edits: source VAE latents (distribution mean, normalised) after the target
tokens, the pipeline's scheduler, true CFG against the negative prompt " " (its documented usage), the ODE loop
of `sampling.edit_loop` jitted once per bucket size.

`edit_fn(images uint8 [B, H, W, 3], instructions) -> uint8 [B, H, W, 3]`, `H` and `W` multiples of 16.
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cogniedit_jax.sampling.edit_loop import (
    EditCondition,
    edit_latents,
    edit_layout,
    pack_latents,
)
from cogniedit_jax.sampling.schedule import SchedulerConfig, make_schedule

NEGATIVE_PROMPT = " "
VAE_SCALE = 8  # pixels per latent


def model_editor(config, lora_dir, client, steps: int, seed: int = 0):
    from cogniedit_jax import parallel
    from cogniedit_jax.models.lora import load_diffusers_lora
    from cogniedit_jax.models.token_focus import WEIGHT_NAME as FOCUS_FILE
    from cogniedit_jax.models.token_focus import load_focus
    from cogniedit_jax.models.vae import normalize_latents, vae_encode
    from cogniedit_jax.train import load_editor

    if config.model.source != "converted":
        raise ValueError(f"model.source is {config.model.source!r}: the benchmarks need a real editor with a VAE "
                         "(model.source='converted', model.path = convert/qwen_image_edit.py's output folder), "
                         "or pass --editor module:function")
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    editor = load_editor(config, mesh)
    vae_cfg, vae_params = editor.vae
    lora = load_diffusers_lora(lora_dir, editor.cfg) if lora_dir else None
    focus = None
    if lora_dir and (Path(lora_dir) / FOCUS_FILE).is_file():  # the trainer exports both into one folder
        focus = load_focus(lora_dir, editor.cfg)
    run = jax.jit(functools.partial(edit_latents, editor.cfg), static_argnames=("layout",))
    base_key = jax.random.key(seed)

    def edit(images, instructions):
        b, h, w, _ = images.shape
        hw = (h // VAE_SCALE, w // VAE_SCALE)
        embeds, mask = client.encode(list(images), list(instructions))
        neg, neg_mask = client.encode(list(images), [NEGATIVE_PROMPT] * b)
        pixels = jnp.asarray(images, jnp.float32).transpose(0, 3, 1, 2) / 127.5 - 1
        source = pack_latents(normalize_latents(vae_cfg, vae_encode(vae_cfg, vae_params, pixels.astype(vae_cfg.compute_dtype))))
        tokens = source.shape[1]
        sigmas, _ = make_schedule(SchedulerConfig(), steps, tokens)
        # Each row's noise depends on (seed, its source pixels, its instruction) only: batching, bucket order and
        # resuming an interrupted run leave every item's edit as it would have been.
        noise = jnp.stack([jax.random.normal(jax.random.fold_in(base_key, zlib.crc32(im.tobytes() + t.encode())
                                                                & 0x7FFFFFFF), source.shape[1:], jnp.float32)
                           for im, t in zip(images, instructions, strict=True)])
        cond = EditCondition(jnp.asarray(embeds), jnp.asarray(mask), source.astype(jnp.float32),
                             jnp.asarray(neg), jnp.asarray(neg_mask))
        latents = run(editor.params, noise, cond, jnp.asarray(sigmas), layout=edit_layout(hw, [hw]),
                      cfg_scale=config.policy.cfg_scale, lora=lora, focus=focus)
        return np.asarray(editor.decode(np.asarray(latents), hw))

    return edit
