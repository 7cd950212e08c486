"""Rollout and the dense GRPO loss on a tiny random model: the theta = theta_old invariant, the gradient
paths of dense vs standard mode, clipping, the KL, and refusal of a mismatched policy."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cogniedit_jax.models.config import MMDiTConfig
from cogniedit_jax.models.lora import Lora, LoraConfig, init_lora
from cogniedit_jax.models.mmdit import init_params
from cogniedit_jax.rl.dense_grpo import LossConfig, dense_grpo_loss, grpo_objective, window_log_probs
from cogniedit_jax.rl.policy import PolicyConfig, Trainable
from cogniedit_jax.rl.rollout import judge_rollout, sample_rollout
from cogniedit_jax.sampling.edit_loop import EditCondition, edit_layout, guided_velocity, model_timestep
from cogniedit_jax.sampling.schedule import SchedulerConfig, make_schedule
from cogniedit_jax.sampling.sde import gaussian_log_prob, sde_mean_std

STEPS, GROUP = 6, 2
MODEL = MMDiTConfig(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=(4, 6, 6),
)
LAYOUT = edit_layout((4, 6), [(4, 4)])


def perturbed_lora(key, scale=0.1):
    """A LoRA whose B is non-zero, so theta differs from the reference model."""
    lora = init_lora(MODEL, LoraConfig(rank=2, alpha=2.0), key)
    flat = traverse_util.flatten_dict(lora.params, sep="/")
    keys = jax.random.split(jax.random.fold_in(key, 1), len(flat))
    flat = {
        n: scale * jax.random.normal(k, v.shape) if n.endswith("/b") else v
        for k, (n, v) in zip(keys, sorted(flat.items()))
    }
    return Lora(traverse_util.unflatten_dict(flat, sep="/"), lora.scale)


@pytest.fixture(scope="module")
def world():
    k = jax.random.split(jax.random.key(0), 6)
    params = init_params(MODEL, k[0])
    mask = jnp.array([[1] * 5, [1] * 3 + [0] * 2])
    cond = EditCondition(
        jax.random.normal(k[1], (2, 5, 24)),
        mask,
        jax.random.normal(k[2], (2, 4, 16)),
        jax.random.normal(k[3], (2, 3, 24)),
        jnp.ones((2, 3), int),
    )
    sigmas, _ = make_schedule(SchedulerConfig(), STEPS, 6)
    return params, cond, sigmas, Trainable(lora=perturbed_lora(k[4]))


def make_rollout(world, k, seed=0, **policy):
    params, cond, sigmas, trainable = world
    policy = PolicyConfig(MODEL, LAYOUT, num_steps=STEPS, k=k, cfg_scale=3.0, **policy)
    rollout = ROLLOUT(policy, params, trainable, cond, sigmas, jax.random.key(seed), GROUP)
    rewards = np.arange(4, dtype=np.float32) * [1, -1, 2, 0.5]
    return judge_rollout(rollout, lambda final: (rewards, np.ones(4, bool)), GROUP), policy


# Module-level jits: tests with the same policy and shapes reuse one compiled executable.
ROLLOUT = jax.jit(sample_rollout, static_argnums=(0, 6))
LOSS = jax.jit(jax.value_and_grad(dense_grpo_loss, has_aux=True), static_argnums=3)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("mode", ["dense", "standard"])
def test_ratio_is_one_at_theta_old(world, k, mode):
    params, _, _, trainable = world
    rollout, policy = make_rollout(world, k)
    (loss, m), grads = LOSS(trainable, params, rollout, LossConfig(policy, mode=mode, clip_eps=1e-3))
    assert abs(float(m["psi_min"])) < 1e-5 and abs(float(m["psi_max"])) < 1e-5, m
    assert abs(float(m["ratio_min"]) - 1) < 1e-5 and abs(float(m["ratio_max"]) - 1) < 1e-5
    assert float(m["clipfrac"]) == 0
    assert np.isfinite(float(loss)) and float(m["kl"]) > 0  # LoRA B != 0: theta differs from the reference
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_rollout_window_and_rewards(world):
    rollout, policy = make_rollout(world, 3)
    r = np.asarray(rollout.window_start)
    assert r.shape == (4,) and np.all((0 <= r) & (r <= STEPS - 3))
    assert np.all(r[0::2] == r[1::2])  # one window per instance, shared by its G samples
    _, _, sigmas, _ = world
    np.testing.assert_array_equal(np.asarray(rollout.sigmas).T, [sigmas[s : s + 4] for s in r])
    assert np.all(np.asarray(rollout.old_log_probs) != 0)
    np.testing.assert_array_equal(rollout.advantages.reshape(2, 2)[:, 0] != 0, True)
    again, _ = make_rollout(world, 3)
    np.testing.assert_array_equal(again.final, rollout.final)
    other, _ = make_rollout(world, 3, seed=1)
    assert not np.allclose(other.final, rollout.final)


@pytest.mark.parametrize("shared", [False, True])
def test_shared_noise_makes_the_window_the_only_difference_within_a_group(world, shared):
    params, cond, sigmas, trainable = world
    policy = PolicyConfig(MODEL, LAYOUT, num_steps=STEPS, k=2, cfg_scale=3.0)
    rollout = jax.jit(sample_rollout, static_argnums=(0, 6, 7))(
        policy, params, trainable, cond, sigmas, jax.random.key(0), GROUP, shared)
    start, after = np.asarray(rollout.start), np.asarray(rollout.next_states[0])
    # rows 0, 1: the two samples of instance 0; rows 0, 2: different instances
    assert np.array_equal(start[0], start[1]) == shared
    assert not np.allclose(after[0], after[1])  # the window's noise is each sample's own
    assert not np.allclose(start[0], start[2])


def test_invalid_samples_are_left_out(world):
    params, _, _, trainable = world
    rollout, policy = make_rollout(world, 3)
    rewards = np.array([1.0, 5.0, np.nan, 2.0], np.float32)
    judged = judge_rollout(rollout, lambda final: (rewards, np.array([True, True, True, False])), GROUP)
    assert np.asarray(judged.valid).tolist() == [True, True, False, False]
    assert np.asarray(judged.advantages)[2:].tolist() == [0, 0]
    (_, m), _ = LOSS(trainable, params, judged, LossConfig(policy, mode="standard", clip_eps=1e-3))
    assert int(m["invalid"]) == 2


def test_dense_gradient_runs_through_earlier_steps(world):
    """d log p(last window step) / d LoRA: dense mode has the path through the earlier steps' states; standard
    mode equals the single step from the stored state."""
    params, cond, _, trainable = world
    rollout, policy = make_rollout(world, 3)

    def last_step_grad(mode):
        cfg = LossConfig(policy, mode=mode, beta=0.0)
        return jax.jit(jax.grad(lambda t: window_log_probs(t, params, rollout, cfg)[0][-1].sum()))(trainable)

    def single_step(t):
        x = rollout.next_states[-2]
        sigma, sigma_next = rollout.sigmas[-2][:, None, None], rollout.sigmas[-1][:, None, None]
        v = guided_velocity(
            MODEL,
            params,
            x,
            rollout.cond,
            model_timestep(rollout.sigmas[-2]),
            LAYOUT,
            policy.cfg_scale,
            t.lora,
        )
        mean, std = sde_mean_std(x, v, sigma, sigma_next, policy.noise_level)
        return gaussian_log_prob(rollout.next_states[-1], mean, std).sum()

    dense, standard = last_step_grad("dense"), last_step_grad("standard")
    direct = jax.jit(jax.grad(single_step))(trainable)
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    rel = lambda a, b: np.abs(flat(a) - flat(b)).max() / np.abs(flat(b)).max()  # noqa: E731
    assert rel(standard, direct) < 1e-4, rel(standard, direct)
    assert rel(dense, standard) > 1e-2, rel(dense, standard)


def test_clipped_psi_gives_no_policy_gradient_and_kl_vanishes_at_reference(world):
    params, _, _, trainable = world
    rollout, policy = make_rollout(world, 3)
    shifted = rollout.replace(old_log_probs=rollout.old_log_probs - 1.0)  # psi = +3 >> log(1 + eps)
    (_, m), grads = LOSS(trainable, params, shifted, LossConfig(policy, beta=0.0))
    assert float(m["clipfrac"]) == 1
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))
    fresh = Trainable(lora=init_lora(MODEL, LoraConfig(rank=2, alpha=2.0), jax.random.key(3)))  # B = 0
    (_, m), _ = LOSS(fresh, params, rollout, LossConfig(policy, beta=1.0))
    assert float(m["kl"]) == 0


def test_a_mismatched_policy_is_refused(world):
    params, _, _, trainable = world
    rollout, policy = make_rollout(world, 3)
    for change in (dict(noise_level=0.5), dict(cfg_scale=1.0), dict(k=2)):
        other = PolicyConfig(**{**policy.__dict__, **change})
        with pytest.raises(ValueError, match=next(iter(change))):
            dense_grpo_loss(trainable, params, rollout, LossConfig(other))
    with pytest.raises(ValueError, match="noise_level"):
        PolicyConfig(MODEL, LAYOUT, noise_level=0.0)
    with pytest.raises(ValueError, match="k=7"):
        PolicyConfig(MODEL, LAYOUT, num_steps=6, k=7)


def test_dense_gradient_equals_finite_differences_in_float64():
    """value_and_grad of the dense loss (KL included) against central differences along random directions of
    the LoRA pytree, in float64. The finite differences are of the loss with the network's inputs held at
    the evaluation point's states: the function whose gradient stop_gradient defines (the state itself still
    carries theta through the SDE means). clip_eps is wide so the small steps stay inside the clip."""
    with jax.enable_x64(True):
        model = MODEL.replace(dtype="float64")
        k = jax.random.split(jax.random.key(7), 6)
        params = init_params(model, k[0], jnp.float64)
        cond = EditCondition(
            jax.random.normal(k[1], (2, 5, 24)),
            jnp.array([[1] * 5, [1] * 3 + [0] * 2]),
            jax.random.normal(k[2], (2, 4, 16)),
        )
        sigmas, _ = make_schedule(SchedulerConfig(), 4, 6)
        lora = perturbed_lora(k[3])
        lora = lora.replace(params=jax.tree.map(lambda a: a.astype(jnp.float64), lora.params))
        policy = PolicyConfig(model, LAYOUT, num_steps=4, k=3, cfg_scale=1.0)
        rollout = sample_rollout(policy, params, Trainable(lora=lora), cond, sigmas, k[4], GROUP)
        assert rollout.next_states.dtype == jnp.float64
        rollout = rollout.replace(advantages=jnp.array([1.0, -0.5, 0.3, -0.8]))
        cfg = LossConfig(policy, clip_eps=0.5, beta=0.1)
        theta = jax.tree.map(lambda a: a + 0.05, lora.params)  # away from theta_old
        as_trainable = lambda p: Trainable(lora=lora.replace(params=p))  # noqa: E731

        _, grad = jax.jit(
            jax.value_and_grad(lambda p: dense_grpo_loss(as_trainable(p), params, rollout, cfg)[0])
        )(theta)
        states = window_log_probs(as_trainable(theta), params, rollout, cfg)[2]
        held = jax.jit(
            lambda p: grpo_objective(
                *window_log_probs(as_trainable(p), params, rollout, cfg, states)[:2], rollout, cfg
            )[0]
        )
        leaves, tree = jax.tree.flatten(theta)
        for seed in range(2):
            keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
            d = jax.tree.unflatten(
                tree, [jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves)]
            )
            h = 1e-5
            fd = (
                held(jax.tree.map(lambda a, b: a + h * b, theta, d))
                - held(jax.tree.map(lambda a, b: a - h * b, theta, d))
            ) / (2 * h)
            analytic = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grad), jax.tree.leaves(d)))
            assert abs(float(fd - analytic)) <= 1e-4 * abs(float(analytic)), (float(fd), float(analytic))
