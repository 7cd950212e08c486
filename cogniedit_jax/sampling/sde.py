"""One flow-matching step from sigma to sigma_next (< sigma): the Euler ODE step, and the
marginal-preserving Euler-Maruyama SDE step of Flow-GRPO with its exact Gaussian log-density.

The SDE (time t = sigma, dt = sigma_next - sigma < 0, noise level a):

    sigma_t = a * sqrt(t / (1 - t))
    x_next  = x + [v + sigma_t^2 / (2 t) * (x + (1 - t) v)] dt + sigma_t sqrt(-dt) eps

The paper's eq. 3 prints the drift without the 1/t; the score of the flow-matching marginal is
-(x + (1 - t) v) / t, so only the form with 1/t keeps the ODE's marginals for every a. We use that form.

t = 1 (the first step starts from pure noise, sigmas[0] == 1 exactly): sigma_t's denominator 1 - t is 0.
Rule: where sigma >= 1 the denominator uses sigma_next instead, i.e. sigma_t = a * sqrt(1 / (1 - sigma_next)).
For the first step sigma_next is the schedule's second sigma, so this is Flow-GRPO's rule
(`sigma_max = sigmas[1]`) without passing the schedule in. The drift's 1/t stays finite (t = 1).

All arithmetic runs in fp32 (fp64 when the sample is fp64, for finite-difference tests) whatever the model's
dtype: log-probabilities of 64-channel latents summed over thousands of tokens do not survive bf16.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from cogniedit_jax.models.config import at_least_f32


def ode_step(sample, velocity, sigma, sigma_next):
    """x + (sigma_next - sigma) v, in fp32: diffusers' `FlowMatchEulerDiscreteScheduler.step`."""
    dtype = at_least_f32(sample)
    return sample.astype(dtype) + (sigma_next - sigma) * velocity.astype(dtype)


def sde_std(sigma, sigma_next, noise_level):
    """sigma_t = a * sqrt(t / (1 - t)) with the t = 1 rule above."""
    denominator = 1.0 - jnp.where(sigma >= 1.0, sigma_next, sigma)
    return noise_level * jnp.sqrt(sigma / denominator)


def sde_mean_std(sample, velocity, sigma, sigma_next, noise_level):
    """(mean, std) of x_next given x: the Gaussian transition of one SDE step."""
    dtype = at_least_f32(sample)
    x = sample.astype(dtype)
    v = velocity.astype(dtype)
    sigma = jnp.asarray(sigma, dtype)
    dt = sigma_next - sigma
    sigma_t = sde_std(sigma, sigma_next, noise_level)
    mean = x + (v + sigma_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    return mean, sigma_t * jnp.sqrt(-dt)


def gaussian_log_prob(x, mean, std, reduce: str = "mean"):
    """log N(x; mean, std^2 I) per batch row: "sum" is the density of the whole latent, "mean" averages over
    its elements (Flow-GRPO's choice, which keeps ratios of large latents in range). Needs std > 0."""
    x = x.astype(at_least_f32(x))
    per_element = -((x - mean) ** 2) / (2 * std**2) - jnp.log(std) - 0.5 * math.log(2 * math.pi)
    axes = tuple(range(1, per_element.ndim))
    if reduce == "mean":
        return per_element.mean(axes)
    if reduce == "sum":
        return per_element.sum(axes)
    raise ValueError(f"reduce={reduce!r}: expected 'mean' or 'sum'")


def sde_step(sample, velocity, sigma, sigma_next, noise_level, noise, reduce: str = "mean"):
    """-> (prev_sample, log_prob [B], prev_mean, std). With noise_level 0 prev_sample is the ODE step
    (log_prob is then undefined: a deterministic step has no density)."""
    mean, std = sde_mean_std(sample, velocity, sigma, sigma_next, noise_level)
    prev = mean + std * noise.astype(mean.dtype)
    return prev, gaussian_log_prob(prev, mean, std, reduce), mean, std
