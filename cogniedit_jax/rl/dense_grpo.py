"""The dense GRPO objective (paper section 3.3, eqs. 7-9) and the Flow-GRPO baseline, as one pure loss.

The k window steps are re-run under theta in a `lax.scan`. In "dense" mode:

    v      = v_theta(stop_gradient(x), t)                       network input cut from the graph (eq. 7)
    mean   = x + [v + s^2 / (2t) (x + (1 - t) v)] dt            from x itself: the state carries gradient
    logp   = log N(x_next_stored; mean, std^2)                  density of the *stored* next state
    x      = mean + std * eps_stored                            = x_next_stored at theta_old, with d/dtheta

The density must be that of the stored state: the regenerated state's own density, log N(mean + std eps;
mean, std), is the same number for every theta and carries no gradient. psi = sum over the window of
(logp - logp_old), ratio = exp(clip(psi, -log(1 + eps), log(1 + eps))) (eq. 8), objective
min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) (eq. 9), minus beta KL(pi_theta || pi_ref), the reference
being the same model with LoRA and focus off; for two Gaussians of equal std the KL is
|mean - mean_ref|^2 / (2 std^2), summed over the window.

"standard" mode is Flow-GRPO (eqs. 2/4): each step starts from the stored state (no path between steps),
per-step ratios are clipped and the objectives averaged over the window.

Every step is rematerialised, so memory does not grow with k; the step arithmetic is fp32 whatever the
model's dtype (`config.at_least_f32`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from cogniedit_jax.rl.policy import MODES, PolicyConfig, Trainable
from cogniedit_jax.rl.rollout import Rollout
from cogniedit_jax.sampling.edit_loop import guided_velocity, model_timestep, per_row
from cogniedit_jax.sampling.sde import gaussian_log_prob, sde_mean_std


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """policy: must equal the rollout's. clip_eps: PPO's epsilon (Flow-GRPO uses 1e-4 with "mean"
    log-densities, whose ratios are close to 1); beta: the KL weight (Flow-GRPO: 0.004; 0 skips the
    reference pass); mode: "dense" (the paper) or "standard" (Flow-GRPO)."""

    policy: PolicyConfig
    clip_eps: float = 1e-4
    beta: float = 0.004
    mode: str = "dense"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"loss mode {self.mode!r}: expected one of {MODES}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps={self.clip_eps}: expected 0 < clip_eps < 1")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta}: must be >= 0")


def window_log_probs(trainable: Trainable, frozen, rollout: Rollout, cfg: LossConfig, network_states=None):
    """(log_probs [k, N], kl [k, N], states [k, N, S, 4C]) of the stored window under theta = (frozen,
    trainable); states: what entered each step (carried in dense mode, stored in standard mode).

    network_states: what the network sees at each step, as constants; by default the states themselves under
    `stop_gradient`. Passing the states of a previous call makes the stop-gradient explicit: the loss as a
    function of theta with those inputs fixed has, at that theta, exactly the gradient `value_and_grad`
    gives, which is how the tests check it against finite differences."""
    policy = rollout.policy
    if policy != cfg.policy:
        raise ValueError(
            "the rollout was sampled under another policy than the loss's; their ratios would "
            "not start at 1. Differences (rollout vs loss): " + "; ".join(policy.mismatch(cfg.policy))
        )
    dense = cfg.mode == "dense"
    stored = jnp.concatenate([rollout.start[None], rollout.next_states[:-1]])

    def velocity(x, sigma, trainable):
        return guided_velocity(
            policy.model,
            frozen,
            x,
            rollout.cond,
            model_timestep(sigma),
            policy.layout,
            policy.cfg_scale,
            trainable.lora,
            trainable.focus,
        )

    def step(x, inputs):
        sigma, sigma_next, eps, x_next_stored, x_stored, x_network = inputs
        x = x if dense else x_stored
        x_network = jax.lax.stop_gradient(x if x_network is None else x_network)
        s, s_next = per_row(sigma, x), per_row(sigma_next, x)
        mean, std = sde_mean_std(x, velocity(x_network, sigma, trainable), s, s_next, policy.noise_level)
        log_prob = gaussian_log_prob(x_next_stored, mean, std, policy.reduce)
        kl = jnp.zeros_like(log_prob)
        if cfg.beta > 0:
            ref_mean, _ = sde_mean_std(
                x,
                jax.lax.stop_gradient(velocity(x_network, sigma, Trainable())),
                s,
                s_next,
                policy.noise_level,
            )
            sq = (mean - ref_mean) ** 2 / (2 * std**2)
            kl = (
                sq.mean(tuple(range(1, sq.ndim)))
                if policy.reduce == "mean"
                else sq.sum(tuple(range(1, sq.ndim)))
            )
        return mean + std * eps.astype(mean.dtype), (log_prob, kl, x)

    inputs = (
        rollout.sigmas[:-1],
        rollout.sigmas[1:],
        rollout.noises,
        rollout.next_states,
        stored,
        network_states,
    )
    _, (log_probs, kl, states) = jax.lax.scan(jax.checkpoint(step), rollout.start, inputs)
    return log_probs, kl, states


def dense_grpo_loss(trainable: Trainable, frozen, rollout: Rollout, cfg: LossConfig):
    """-> (loss, metrics). Pure; `jax.value_and_grad(dense_grpo_loss, has_aux=True)` under jit with `cfg`
    static. Loss = -(mean over valid samples of the clipped objective) + beta * mean KL."""
    log_probs, kl, _ = window_log_probs(trainable, frozen, rollout, cfg)
    return grpo_objective(log_probs, kl, rollout, cfg)


def grpo_objective(log_probs, kl, rollout: Rollout, cfg: LossConfig):
    """(loss, metrics) from the window's log-probs and KLs under theta (`window_log_probs`)."""
    log_ratio = log_probs - rollout.old_log_probs.astype(log_probs.dtype)  # [k, N]
    adv = rollout.advantages.astype(log_probs.dtype)
    eps = cfg.clip_eps

    def ppo(ratio):
        return jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - eps, 1 + eps) * adv)

    psi = log_ratio.sum(0)
    if cfg.mode == "dense":
        bound = math.log1p(eps)
        ratio = jnp.exp(jnp.clip(psi, -bound, bound))
        objective, clipped = ppo(ratio), jnp.abs(psi) > bound
    else:
        ratio = jnp.exp(log_ratio)
        objective, clipped = ppo(ratio).mean(0), (jnp.abs(ratio - 1) > eps).mean(0)
    valid = rollout.valid
    weight = valid / jnp.maximum(valid.sum(), 1)
    kl_per_sample = kl.sum(0)
    policy_loss = -(weight * objective).sum()
    kl_mean = (weight * kl_per_sample).sum()
    loss = policy_loss + cfg.beta * kl_mean

    def masked_stats(x):
        big = jnp.finfo(x.dtype).max
        n = jnp.maximum(valid.sum(), 1)
        mean = jnp.where(valid, x, 0).sum() / n
        return mean, jnp.where(valid, x, big).min(), jnp.where(valid, x, -big).max()

    ratio_rows = ratio if ratio.ndim == 1 else ratio.mean(0)
    ratio_mean, ratio_min, ratio_max = masked_stats(ratio_rows)
    psi_mean, psi_min, psi_max = masked_stats(psi)
    adv_mean, adv_min, adv_max = masked_stats(adv)
    metrics = {
        "loss": loss,
        "policy_loss": policy_loss,
        "kl": kl_mean,
        "ratio_mean": ratio_mean,
        "ratio_min": ratio_min,
        "ratio_max": ratio_max,
        "clipfrac": (weight * clipped).sum(),
        "psi_mean": psi_mean,
        "psi_min": psi_min,
        "psi_max": psi_max,
        "adv_mean": adv_mean,
        "adv_min": adv_min,
        "adv_max": adv_max,
        "invalid": (~valid).sum(),
    }
    return loss, metrics
