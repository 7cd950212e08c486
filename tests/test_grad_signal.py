"""The gradient-signal diagnostic: the cosine estimator on gradients of known signal fraction, and the
demo's smoke config end to end (independent steps, reproducible)."""

import json

import numpy as np
import pytest

from cogniedit_jax import config as config_lib
from cogniedit_jax.bench import grad_signal
from cogniedit_jax.demo import run


@pytest.mark.parametrize("signal_fraction", [0.0, 0.2, 1.0])
def test_cosine_is_the_signal_fraction(signal_fraction):
    rng = np.random.default_rng(0)
    n, p = 12, 200_000
    shared = rng.normal(size=p) * np.sqrt(signal_fraction)
    grads = shared + rng.normal(size=(n, p)) * np.sqrt(1 - signal_fraction)
    cosine, sem = grad_signal.pairwise_cosine(grads)
    assert abs(cosine - signal_fraction) < 0.01, cosine
    assert sem < 0.01


def test_cosine_needs_three_gradients():
    with pytest.raises(ValueError, match="2 gradients: need at least 3"):
        grad_signal.pairwise_cosine(np.ones((2, 5)))


def test_demo_steps_are_independent_and_reproducible(capsys):
    config = config_lib.load_config(f"{run.DEFAULT_CONFIG}:smoke", [])
    grads, spreads = grad_signal.step_gradients(config, 3)
    assert grads.shape[0] == 3 and np.all(np.isfinite(grads)) and np.all(np.isfinite(spreads))
    assert np.all(np.linalg.norm(grads, axis=1) > 0)
    assert not np.allclose(grads[0], grads[1])  # each step its own instances and noise
    again, _ = grad_signal.step_gradients(config, 3)
    np.testing.assert_array_equal(again, grads)
    assert grad_signal.main(["--config", f"{run.DEFAULT_CONFIG}:smoke", "--batches", "3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["batches"] == 3 and -1 <= out["cosine"] <= 1
