"""The Qwen-Image-Edit denoising loop as one jitted `lax.scan`, with any subset of steps stochastic.

What the pipeline (diffusers' `QwenImageEditPipeline`) does each step, and so do we:
  1. the noisy target latents (packed 2x2 patches) are followed by the source image's latents;
     `img_shapes` names both, target first;
  2. the model's output is cut back to the target tokens;
  3. with true CFG the conditional and negative predictions are combined, neg + s (cond - neg), and each
     token's combined vector is rescaled to the conditional prediction's norm;
  4. one flow-matching step from sigma_i to sigma_{i+1}.

Differences from the pipeline, on purpose: the conditional and negative passes run as one batch of 2B
(the shorter text padded under its mask, which the model ignores exactly); the state is carried in fp32
whatever the model dtype, because the SDE log-densities of GRPO are taken on it; and each step has its own
noise level: 0 is the ODE step, > 0 the SDE step of `sde.py`, in the same code path, so a rollout and the
loss that re-runs its window see identical arithmetic.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cogniedit_jax.models.config import at_least_f32
from cogniedit_jax.models.mmdit import transformer_forward
from cogniedit_jax.sampling.sde import gaussian_log_prob, sde_mean_std

Layout = tuple[tuple[int, int, int], ...]


def pack_latents(latents):
    """[B, C, H, W] latents -> [B, (H/2)(W/2), 4C] tokens of 2x2 patches (the pipeline's `_pack_latents`)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(
            f"latents of shape {latents.shape}: height and width must be even to pack 2x2 patches"
        )
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens, height: int, width: int):
    """Inverse of `pack_latents` for latents of height x width."""
    b, n, c4 = tokens.shape
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} tokens do not tile latents of {height}x{width} in 2x2 patches")
    x = tokens.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def edit_layout(target_hw: tuple[int, int], source_hws: list[tuple[int, int]]) -> Layout:
    """One batch row's `img_shapes` from latent sizes: the target first, then each source image."""
    for h, w in [target_hw, *source_hws]:
        if h % 2 or w % 2:
            raise ValueError(f"latent size {h}x{w}: height and width must be even")
    return tuple((1, h // 2, w // 2) for h, w in [target_hw, *source_hws])


@flax.struct.dataclass
class EditCondition:
    """What the model is conditioned on, per batch row (B rows).

    prompt_embeds [B, L, D] and prompt_mask [B, L] (1 = valid) as the condition encoder gives them;
    source_latents [B, S_src, 4C]: the source image(s) packed, VAE-normalised (latents_mean/std);
    negative_embeds/negative_mask: the negative prompt for true CFG, or None for no CFG.
    """

    prompt_embeds: jax.Array
    prompt_mask: jax.Array
    source_latents: jax.Array
    negative_embeds: Any = None
    negative_mask: Any = None


@flax.struct.dataclass
class Trajectory:
    """A sampled edit. latents: the final packed target latents [B, S, 4C] (fp32).
    states [T + 1, B, S, 4C]: x before each step and the final x; noises [T, B, S, 4C]: the eps each step
    drew (unused by ODE steps); log_probs [T, B]: log p(states[i + 1] | states[i]) for SDE steps, 0 for ODE
    steps."""

    latents: jax.Array
    states: jax.Array
    noises: jax.Array
    log_probs: jax.Array


def _pad_text(x, length: int):
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _model_text(cond: EditCondition):
    """Text states and mask for one model call: [B] rows, or [2B] (conditional, then negative) under CFG."""
    if cond.negative_embeds is None:
        return cond.prompt_embeds, cond.prompt_mask
    length = max(cond.prompt_embeds.shape[1], cond.negative_embeds.shape[1])
    embeds = jnp.concatenate([_pad_text(cond.prompt_embeds, length), _pad_text(cond.negative_embeds, length)])
    mask = jnp.concatenate([_pad_text(cond.prompt_mask, length), _pad_text(cond.negative_mask, length)])
    return embeds, mask


def guided_velocity(
    model_cfg, params, x, cond: EditCondition, timestep, layout: Layout, cfg_scale, lora=None, focus=None
):
    """The pipeline's noise prediction for target latents x [B, S, 4C] at `timestep` (= t / 1000, the
    pipeline's model input; scalar or per row), in `at_least_f32(x)`: the target part of the output, with
    true CFG and norm rescaling when `cond` has a negative prompt."""
    text, mask = _model_text(cond)
    rows = text.shape[0] // x.shape[0]
    model_in = jnp.concatenate([x.astype(cond.source_latents.dtype), cond.source_latents], axis=1)
    model_in = jnp.concatenate([model_in] * rows)
    t = jnp.concatenate([jnp.broadcast_to(timestep, x.shape[:1])] * rows)
    out = transformer_forward(
        model_cfg, params, model_in, text, mask, t, [layout] * text.shape[0], lora=lora, focus=focus
    )
    out = out[:, : x.shape[1]].astype(at_least_f32(x))
    if rows == 1:
        return out
    cond_v, neg_v = jnp.split(out, 2)
    comb = neg_v + cfg_scale * (cond_v - neg_v)
    return comb * (
        jnp.linalg.norm(cond_v, axis=-1, keepdims=True) / jnp.linalg.norm(comb, axis=-1, keepdims=True)
    )


def per_row(v, x):
    """A scalar or per-row [N] value shaped to broadcast against x [N, ...]."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


def model_timestep(sigmas, num_train_timesteps: int = 1000):
    """The model's timestep input for sigmas: the pipeline feeds t / 1000 with t = 1000 sigma rounded in
    fp32, which is not always sigma itself."""
    return sigmas * num_train_timesteps / num_train_timesteps


def flow_step(x, velocity, sigma, sigma_next, noise_level, noise, reduce: str = "mean"):
    """One step with noise level `noise_level` (0: the ODE step) -> (x_next, log_prob [N], mean, std).
    sigma, sigma_next and noise_level are scalars or per row [N].

    log_prob is that of x_next under the step's Gaussian and 0 where the step is deterministic; the
    std is clamped away from 0 only inside the density so an ODE step gives no NaN (the `where` discards it).
    """
    mean, std = sde_mean_std(x, velocity, per_row(sigma, x), per_row(sigma_next, x), per_row(noise_level, x))
    x_next = mean + std * noise.astype(mean.dtype)
    log_prob = gaussian_log_prob(x_next, mean, jnp.maximum(std, 1e-12), reduce)
    return x_next, jnp.where(jnp.asarray(noise_level) > 0, log_prob, 0.0), mean, std


def sample_trajectory(
    model_cfg,
    params,
    noise,
    cond: EditCondition,
    sigmas,
    noise_levels,
    key,
    *,
    layout: Layout,
    cfg_scale=4.0,
    num_train_timesteps: int = 1000,
    lora=None,
    focus=None,
    reduce: str = "mean",
) -> Trajectory:
    """Run all T steps from x_T = `noise` [B, S, 4C] in one `lax.scan`. Pure; call it under `jax.jit`
    with `layout` (and `reduce`) static.

    sigmas [T + 1] (from `schedule.make_schedule`), noise_levels [T] or per row [T, N] (0 = ODE step; e.g.
    a GRPO window of k SDE steps), key: the step noises are `normal(fold_in(key, i))`, so a trajectory is
    reproducible from (noise, key). The state is carried in `at_least_f32(noise)` (fp32, or fp64 in tests).
    """
    dtype = at_least_f32(noise)
    sigmas = jnp.asarray(sigmas, dtype)
    noise_levels = jnp.asarray(noise_levels, dtype)
    steps = noise_levels.shape[0]
    if sigmas.shape[0] != steps + 1:
        raise ValueError(f"sigmas has {sigmas.shape[0]} entries, expected noise_levels' {steps} steps + 1")
    timesteps = model_timestep(sigmas[:-1], num_train_timesteps)

    def step(x, i):
        eps = jax.random.normal(jax.random.fold_in(key, i), x.shape, dtype)
        v = guided_velocity(model_cfg, params, x, cond, timesteps[i], layout, cfg_scale, lora, focus)
        x_next, log_prob, _, _ = flow_step(x, v, sigmas[i], sigmas[i + 1], noise_levels[i], eps, reduce)
        return x_next, (x, eps, jnp.broadcast_to(log_prob, x.shape[:1]))

    final, (states, noises, log_probs) = jax.lax.scan(step, noise.astype(dtype), jnp.arange(steps))
    return Trajectory(final, jnp.concatenate([states, final[None]]), noises, log_probs)


def edit_latents(
    model_cfg,
    params,
    noise,
    cond: EditCondition,
    sigmas,
    *,
    layout: Layout,
    cfg_scale=4.0,
    lora=None,
    focus=None,
):
    """The deterministic (ODE) edit: final packed target latents [B, S, 4C]. Keeping only `latents` lets
    XLA drop the stored trajectory."""
    steps = np.shape(sigmas)[0] - 1
    return sample_trajectory(
        model_cfg,
        params,
        noise,
        cond,
        sigmas,
        np.zeros(steps, np.float32),
        jax.random.key(0),
        layout=layout,
        cfg_scale=cfg_scale,
        lora=lora,
        focus=focus,
    ).latents
