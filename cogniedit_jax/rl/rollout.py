"""Rollouts under theta_old (Algorithm 1, lines 6-11): B instances x G samples, each with a window of k
consecutive SDE steps at a random start, ODE steps elsewhere, then judged.

`sample_rollout` is pure and jit-able (one `lax.scan` over all T steps, the window chosen per step by its
noise level); `judge_rollout` is the side-effecting edge: it hands the final latents to a decode + judge
function and turns the rewards into advantages.
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cogniedit_jax.rl.advantages import compute_advantages
from cogniedit_jax.rl.policy import PolicyConfig, Trainable
from cogniedit_jax.sampling.edit_loop import EditCondition, sample_trajectory


@flax.struct.dataclass
class Rollout:
    """N = B * G sampled edits (row b * G + i is sample i of instance b) and what the loss needs of them.

    cond: the condition per row; start [N, S, 4C]: the state entering the window; noises, next_states
    [k, N, S, 4C]: each window step's eps and the stored next state; old_log_probs [k, N]: their
    log-densities under theta_old; sigmas [k + 1, N]: the window's sigmas per row; final [N, S, 4C]: x_0;
    window_start [N]; rewards, advantages [N] and valid [N] (False: the judge failed) after judging.
    policy: the `PolicyConfig` that made it (static).
    """

    cond: EditCondition
    start: jax.Array
    noises: jax.Array
    next_states: jax.Array
    old_log_probs: jax.Array
    sigmas: jax.Array
    final: jax.Array
    window_start: jax.Array
    rewards: jax.Array
    advantages: jax.Array
    valid: jax.Array
    policy: PolicyConfig = flax.struct.field(pytree_node=False)


def repeat_rows(tree, times: int):
    """Each batch row repeated `times` times in place (b0, b0, ..., b1, b1, ...)."""
    return jax.tree.map(lambda x: jnp.repeat(x, times, axis=0), tree)


def sample_rollout(
    policy: PolicyConfig, params, trainable: Trainable, cond: EditCondition, sigmas, key, group_size: int,
    shared_noise: bool = False,
) -> Rollout:
    """G = group_size samples for each of the B instances in `cond`. Pure: jit it with `policy` and
    `group_size` static. sigmas [T + 1] with T = policy.num_steps. The window start r ~ Uniform{0..T-k}
    is drawn per instance (Algorithm 1, line 7) and shared by its G samples.

    shared_noise: the G samples of an instance also share their initial noise, so they reach x_r together
    ("initialize x_r^{b,1:G}", line 7) and differ only by the window's SDE noise. The ODE steps outside the
    window are deterministic, so every reward difference within a group is then caused by the very steps
    whose log-densities the loss weighs; with independent initial noise most of it comes from the start,
    which the loss cannot credit, and only adds variance to the gradient."""
    steps, k = policy.num_steps, policy.k
    if np.shape(sigmas) != (steps + 1,):
        raise ValueError(f"sigmas of shape {np.shape(sigmas)}: expected ({steps + 1},) for num_steps={steps}")
    batch = cond.prompt_embeds.shape[0]
    rows = batch * group_size
    key_noise, key_window, key_steps = jax.random.split(key, 3)
    tokens = policy.layout[0][1] * policy.layout[0][2]
    noise = jax.random.normal(key_noise, (batch if shared_noise else rows, tokens, policy.model.in_channels))
    if shared_noise:
        noise = jnp.repeat(noise, group_size, axis=0)
    r = jnp.repeat(jax.random.randint(key_window, (batch,), 0, steps - k + 1), group_size)
    i = jnp.arange(steps)[:, None]
    levels = jnp.where((i >= r) & (i < r + k), policy.noise_level, 0.0)
    cond = repeat_rows(cond, group_size)
    traj = sample_trajectory(
        policy.model,
        params,
        noise,
        cond,
        sigmas,
        levels,
        key_steps,
        layout=policy.layout,
        cfg_scale=policy.cfg_scale,
        lora=trainable.lora,
        focus=trainable.focus,
        reduce=policy.reduce,
    )

    def window(a, length):  # a [steps(+1), N, ...] -> [length, N, ...] from each row's r
        return jax.vmap(lambda col, start: jax.lax.dynamic_slice_in_dim(col, start, length), (1, 0), 1)(a, r)

    sigma_rows = jnp.broadcast_to(jnp.asarray(sigmas, traj.latents.dtype)[:, None], (steps + 1, rows))
    zeros = jnp.zeros((rows,), jnp.float32)
    return Rollout(
        cond=cond,
        start=window(traj.states, 1)[0],
        noises=window(traj.noises, k),
        next_states=window(traj.states[1:], k),
        old_log_probs=window(traj.log_probs, k),
        sigmas=window(sigma_rows, k + 1),
        final=traj.latents,
        window_start=r,
        rewards=zeros,
        advantages=zeros,
        valid=jnp.ones((rows,), bool),
        policy=policy,
    )


def judge_rollout(
    rollout: Rollout, judge: Callable, group_size: int, advantage_mode: str = "batch"
) -> Rollout:
    """Score the final latents and attach rewards and advantages.

    judge(final_latents [N, S, 4C]) -> (rewards [N], valid [N]): decoding and judging live there (the
    sidecar, or any function of images). Invalid samples get advantage 0 and are left out of the
    advantage statistics and of the loss."""
    rewards, valid = judge(rollout.final)
    rewards = np.asarray(rewards, np.float32).reshape(-1, group_size)
    valid = np.asarray(valid, bool).reshape(-1, group_size) & np.isfinite(rewards)
    advantages = compute_advantages(rewards, advantage_mode, valid)
    return rollout.replace(
        rewards=jnp.asarray(np.where(valid, rewards, 0.0).reshape(-1)),
        advantages=advantages.reshape(-1),
        valid=jnp.asarray(valid.reshape(-1)),
    )
