"""The jitted edit loop against diffusers' `QwenImageEditPipeline` denoising loop (tiny random models, fp32).

The pipeline runs end to end from a PIL source image (its VAE encodes it); a forward pre-hook on its
transformer records the source latents and `img_shapes` it builds, so our loop gets exactly the same
inputs. The pipeline's one-megapixel source size is shrunk (`source_area`) to keep the test fast; the
code path is unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLQwenImage, QwenImageEditPipeline
from PIL import Image

from cogniedit_jax.bench.reference import edit_pipeline, recorded_source_latents, source_area
from cogniedit_jax.sampling.edit_loop import (
    EditCondition,
    edit_latents,
    edit_layout,
    flow_step,
    guided_velocity,
    pack_latents,
    sample_trajectory,
    unpack_latents,
)
from cogniedit_jax.sampling.schedule import SchedulerConfig, make_schedule
from cogniedit_jax.sampling.sde import ode_step, sde_step
from tests.reference import convert_and_load, tiny_transformer

STEPS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    transformer = tiny_transformer(seed=3)
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.7, 1.1, 2.0],
    ).eval()
    cfg, params = convert_and_load(transformer, tmp_path_factory.mktemp("edit"))
    return transformer, vae, cfg, params


def run_pipeline(transformer, vae, *, batch, txt_lens, neg_len=None, cfg_scale=1.0):
    """The pipeline's final packed latents, plus the inputs it fed its transformer."""
    g = torch.Generator().manual_seed(1)
    height, width = 48, 80  # the output: 3 x 5 patches of 16 px
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 110, 3), dtype=np.uint8))

    def text(lengths, max_len):
        embeds = torch.randn(batch, max_len, transformer.config.joint_attention_dim, generator=g)
        mask = torch.zeros(batch, max_len, dtype=torch.long)
        for b, n in enumerate(lengths):
            mask[b, :n] = 1
        return embeds, mask

    embeds, mask = text(txt_lens, max(txt_lens))
    neg = text([neg_len] * batch, neg_len) if neg_len else (None, None)
    noise = torch.randn(batch, (height // 16) * (width // 16), transformer.config.in_channels, generator=g)
    with source_area(96 * 64), recorded_source_latents(transformer, noise.shape[1]) as seen, torch.no_grad():
        out = edit_pipeline(transformer, vae)(
            image=source,
            prompt_embeds=embeds,
            prompt_embeds_mask=mask,
            negative_prompt_embeds=neg[0],
            negative_prompt_embeds_mask=neg[1],
            true_cfg_scale=cfg_scale,
            height=height,
            width=width,
            num_inference_steps=STEPS,
            latents=noise,
            output_type="latent",
        ).images
    cond = EditCondition(
        jnp.asarray(embeds.numpy()),
        jnp.asarray(mask.numpy()),
        jnp.asarray(seen["source"].numpy()),
        None if neg[0] is None else jnp.asarray(neg[0].numpy()),
        None if neg[1] is None else jnp.asarray(neg[1].numpy()),
    )
    return out.numpy(), jnp.asarray(noise.numpy()), cond, seen["img_shapes"]


@pytest.mark.parametrize("cfg_scale, neg_len", [(1.0, None), (4.0, 5)], ids=["no_cfg", "true_cfg"])
def test_ode_loop_matches_pipeline(models, cfg_scale, neg_len):
    transformer, vae, cfg, params = models
    expected, noise, cond, img_shapes = run_pipeline(
        transformer, vae, batch=2, txt_lens=[7, 4], neg_len=neg_len, cfg_scale=cfg_scale
    )
    layout = edit_layout((6, 10), [(8, 12)])  # output 48x80 px; source 64x96 px (the shrunk "megapixel")
    assert [tuple(map(tuple, row)) for row in img_shapes] == [layout] * 2
    sigmas, _ = make_schedule(SchedulerConfig(), STEPS, noise.shape[1])
    run = jax.jit(functools.partial(edit_latents, cfg, layout=layout, cfg_scale=cfg_scale))
    got = np.asarray(run(params, noise, cond, sigmas))
    err = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"edit-loop rel err {err:.2e}")
    assert err <= 1e-4, err


def test_pack_is_the_pipelines_and_unpack_inverts_it():
    x = torch.randn(2, 4, 6, 10)
    expected = QwenImageEditPipeline._pack_latents(x, 2, 4, 6, 10)
    packed = pack_latents(jnp.asarray(x.numpy()))
    np.testing.assert_array_equal(np.asarray(packed), expected.numpy())
    np.testing.assert_array_equal(np.asarray(unpack_latents(packed, 6, 10)), x.numpy())
    with pytest.raises(ValueError, match="even"):
        pack_latents(jnp.zeros((1, 4, 5, 6)))


def test_flow_step_is_ode_at_level_zero_and_sde_otherwise():
    key = jax.random.key(0)
    x, v, eps = jax.random.normal(key, (3, 2, 5, 8))
    for sigma, sigma_next in [(1.0, 0.8), (0.6, 0.45)]:
        ode, log_prob, _, _ = flow_step(x, v, sigma, sigma_next, 0.0, eps)
        np.testing.assert_allclose(ode, ode_step(x, v, sigma, sigma_next), rtol=1e-6, atol=1e-6)
        assert np.all(np.asarray(log_prob) == 0)
        got = flow_step(x, v, sigma, sigma_next, 0.7, eps, reduce="sum")
        for a, b in zip(got, sde_step(x, v, sigma, sigma_next, 0.7, eps, reduce="sum")):
            np.testing.assert_array_equal(a, b)


def test_trajectory_records_what_grpo_needs(models):
    """States chain through the steps, SDE steps' log-probs are those of the stored next states, and the
    step noises are reproducible from the key."""
    _, _, cfg, params = models
    layout = edit_layout((4, 6), [(4, 4)])
    key = jax.random.key(5)
    k1, k2, k3 = jax.random.split(key, 3)
    noise = jax.random.normal(k1, (2, 6, cfg.in_channels))
    cond = EditCondition(
        jax.random.normal(k2, (2, 5, cfg.joint_attention_dim)),
        jnp.array([[1] * 5, [1] * 3 + [0] * 2]),
        jax.random.normal(k3, (2, 4, cfg.in_channels)),
    )
    sigmas, _ = make_schedule(SchedulerConfig(), STEPS, 6)
    levels = np.array([0.0, 0.7, 0.7, 0.0], np.float32)
    run = jax.jit(functools.partial(sample_trajectory, cfg, layout=layout, cfg_scale=1.0))
    traj = run(params, noise, cond, sigmas, levels, key)
    np.testing.assert_array_equal(traj.states[0], noise)
    np.testing.assert_array_equal(traj.states[-1], traj.latents)
    assert np.all(np.asarray(traj.log_probs)[[0, 3]] == 0)
    for i in (1, 2):
        eps = jax.random.normal(jax.random.fold_in(key, i), noise.shape)
        np.testing.assert_array_equal(traj.noises[i], eps)
        v = guided_velocity(cfg, params, traj.states[i], cond, sigmas[i], layout, 1.0)
        nxt, log_prob, _, _ = sde_step(traj.states[i], v, sigmas[i], sigmas[i + 1], 0.7, eps)
        np.testing.assert_allclose(nxt, traj.states[i + 1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(log_prob, traj.log_probs[i], rtol=1e-5)
    again = run(params, noise, cond, sigmas, levels, key)
    np.testing.assert_array_equal(again.latents, traj.latents)
