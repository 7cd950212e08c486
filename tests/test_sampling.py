"""Scheduler parity with diffusers and the SDE step's invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift

from cogniedit_jax.sampling.schedule import SchedulerConfig, make_schedule
from cogniedit_jax.sampling.sde import gaussian_log_prob, ode_step, sde_step


@pytest.mark.parametrize("steps,tokens", [(50, 4096), (28, 1024), (10, 300), (2, 64), (7, 9000)])
def test_schedule_matches_diffusers_exactly(steps, tokens):
    cfg = SchedulerConfig()
    ref = FlowMatchEulerDiscreteScheduler(**{k: getattr(cfg, k) for k in vars(cfg)})
    mu = calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    ref.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sigmas, timesteps = make_schedule(cfg, steps, tokens)
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0


def test_schedule_refuses_what_diffusers_gets_wrong():
    with pytest.raises(ValueError, match="num_steps=1"):
        make_schedule(SchedulerConfig(), 1, 64)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        SchedulerConfig.from_diffusers({"use_karras_sigmas": True})


def _state(seed, shape=(2, 6, 8)):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, shape), jax.random.normal(k2, shape), jax.random.normal(k3, shape))


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.95), (0.6, 0.5), (0.05, 0.0)])
def test_sde_with_zero_noise_is_the_ode_step(sigma, sigma_next):
    x, v, eps = _state(0)
    prev, _, mean, std = sde_step(x, v, sigma, sigma_next, 0.0, eps)
    np.testing.assert_allclose(prev, ode_step(x, v, sigma, sigma_next), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean, prev, rtol=0, atol=0)
    assert float(std) == 0.0


def test_sde_first_step_is_finite_and_uses_next_sigma():
    x, v, eps = _state(1)
    prev, logp, mean, std = sde_step(x, v, 1.0, 0.9, 0.7, eps)
    assert np.isfinite(np.asarray(prev)).all() and np.isfinite(np.asarray(logp)).all()
    np.testing.assert_allclose(std, 0.7 * math.sqrt(1.0 / (1 - 0.9)) * math.sqrt(0.1), rtol=1e-6)


def test_sde_empirical_moments_match_mean_and_std():
    x, v, _ = _state(2, (1, 4, 4))
    noise = jax.random.normal(jax.random.key(3), (20000, 4, 4))
    prev, _, mean, std = jax.vmap(lambda e: sde_step(x[0], v[0], 0.6, 0.5, 0.8, e))(noise)
    np.testing.assert_allclose(prev.mean(0), mean[0], atol=4 * float(std[0]) / math.sqrt(20000))
    np.testing.assert_allclose(prev.std(0), np.full((4, 4), float(std[0])), rtol=0.03)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_is_the_gaussian_density(reduce):
    x, v, eps = _state(4)
    prev, logp, mean, std = sde_step(x, v, 0.6, 0.5, 0.8, eps, reduce=reduce)
    s = float(std)
    dens = (-(np.asarray(prev, np.float64) - np.asarray(mean, np.float64)) ** 2 / (2 * s * s)
            - math.log(s) - 0.5 * math.log(2 * math.pi)).reshape(2, -1)
    np.testing.assert_allclose(logp, dens.mean(1) if reduce == "mean" else dens.sum(1), rtol=1e-5)
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(prev, mean, std, "max")
