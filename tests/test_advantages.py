"""compute_advantages: the paper's batch normalisation, standard GRPO, the literal A^b, invalid rewards."""

import numpy as np
import pytest

from cogniedit_jax.rl.advantages import compute_advantages

REWARDS = np.array([[9.0, 12.0, 6.0], [3.0, 15.0, 10.5]], np.float32)


def test_batch_mode_normalises_over_all_samples():
    expected = (REWARDS - REWARDS.mean()) / REWARDS.std()  # population std
    np.testing.assert_allclose(compute_advantages(REWARDS, "batch"), expected, rtol=1e-6)


def test_group_mode_normalises_per_instance():
    mean, std = REWARDS.mean(1, keepdims=True), REWARDS.std(1, keepdims=True)
    np.testing.assert_allclose(compute_advantages(REWARDS, "group"), (REWARDS - mean) / std, rtol=1e-6)


def test_group_centered_keeps_a_near_tie_small():
    """A group whose rewards differ by judge noise keeps small advantages (plain group normalisation would
    give them +-1.34, like a real difference); instance difficulty still cancels."""
    rewards = np.array([[10.0, 10.01, 10.02, 10.03], [5.0, 13.0, 5.0, 13.0]], np.float32)
    centered = rewards - rewards.mean(1, keepdims=True)
    expected = centered / centered.std()
    np.testing.assert_allclose(compute_advantages(rewards, "group_centered"), expected, rtol=1e-4, atol=1e-6)
    assert np.abs(expected[0]).max() < 0.01
    np.testing.assert_allclose(compute_advantages(rewards + np.array([[100.0], [0.0]], np.float32),
                                                  "group_centered"), expected, rtol=1e-3, atol=1e-5)


def test_paper_mean_is_one_value_per_instance():
    per_sample = (REWARDS - REWARDS.mean()) / REWARDS.std()
    expected = np.repeat(per_sample.mean(1, keepdims=True), 3, axis=1)
    np.testing.assert_allclose(compute_advantages(REWARDS, "paper_mean"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["batch", "group", "group_centered", "paper_mean"])
def test_constant_rewards_give_zeros(mode):
    for rewards in (np.full((2, 4), 0.1, np.float32), np.full((1, 1), 7.0, np.float32)):
        adv = np.asarray(compute_advantages(rewards, mode))
        assert np.all(adv == 0), adv


def test_group_mode_zero_for_a_constant_group_only():
    rewards = np.array([[5.0, 5.0], [1.0, 3.0]], np.float32)
    np.testing.assert_allclose(compute_advantages(rewards, "group"), [[0, 0], [-1, 1]])


@pytest.mark.parametrize("mode", ["batch", "group", "group_centered", "paper_mean"])
def test_invalid_rewards_are_left_out(mode):
    valid = np.array([[True, False, True], [True, True, True]])
    adv = np.asarray(compute_advantages(REWARDS, mode, valid))
    assert adv[0, 1] == 0
    changed = REWARDS.copy()
    changed[0, 1] = -1e6  # whatever the judge left there must not move anyone's advantage
    np.testing.assert_array_equal(compute_advantages(changed, mode, valid), adv)
    with_nan = REWARDS.copy()
    with_nan[0, 1] = np.nan  # a non-finite reward counts as invalid by itself
    np.testing.assert_array_equal(compute_advantages(with_nan, mode), adv)
    kept = REWARDS[valid]
    if mode == "batch":
        np.testing.assert_allclose(adv[valid], (kept - kept.mean()) / kept.std(), rtol=1e-6)


def test_all_invalid_and_bad_input():
    assert np.all(np.asarray(compute_advantages(REWARDS, "batch", np.zeros((2, 3), bool))) == 0)
    with pytest.raises(ValueError, match="expected one of"):
        compute_advantages(REWARDS, "per_token")
    with pytest.raises(ValueError, match=r"expected \[B, G\]"):
        compute_advantages(REWARDS.reshape(-1), "batch")
