"""Training FLOPs from the traced program: exact for matrix products, loops counted per iteration."""

import jax
import jax.numpy as jnp
import pytest

from cogniedit_jax import config as config_lib
from cogniedit_jax.bench.flops import matmul_flops, training_step_flops
from cogniedit_jax.demo import run

N = 16
MATMUL = 2 * N**3


def test_scan_counts_every_iteration_and_grad_counts_the_backward():
    x = jnp.ones((N, N))

    def loop(x):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ x), None), x, None, length=7)[0].sum()

    assert matmul_flops(loop, x) == 7 * MATMUL
    # backward: the gradients of c @ x with respect to both c and x, two more products per iteration
    assert matmul_flops(jax.grad(loop), x) == 3 * 7 * MATMUL
    # rematerialised: the forward product runs again in the backward pass (the tanh needs its output)
    remat = lambda x: jax.lax.scan(lambda c, _: (jax.checkpoint(lambda c: jnp.tanh(c @ x))(c), None), x, None,  # noqa: E731
                                   length=7)[0].sum()
    assert matmul_flops(jax.grad(remat), x) == 4 * 7 * MATMUL


def test_cond_counts_its_costliest_branch_and_while_is_refused():
    x = jnp.ones((N, N))
    assert matmul_flops(lambda p, x: jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x, x), True, x) == 2 * MATMUL
    with pytest.raises(ValueError, match="while loop"):
        matmul_flops(lambda x: jax.lax.while_loop(lambda c: c.sum() < 0, lambda c: c @ c, x), x)


def test_training_step_flops_follow_the_step_counts():
    """The rollout runs T model calls per sample and the update's window k; dense and standard GRPO call the
    model alike, so their step costs agree."""

    def flops(*overrides):
        return training_step_flops(config_lib.load_config(f"{run.DEFAULT_CONFIG}:smoke", list(overrides)))

    base = flops("policy.num_steps=4", "policy.k=2")
    assert flops("policy.num_steps=8", "policy.k=2")["rollout"] == 2 * base["rollout"]
    # the update's few products outside the window (the loss's own) make it a hair under linear in k
    assert flops("policy.num_steps=4", "policy.k=4")["update"] == pytest.approx(2 * base["update"], rel=1e-3)
    standard = flops("policy.num_steps=4", "policy.k=2", "loss.mode=standard")
    assert standard["step"] == pytest.approx(base["step"], rel=5e-3)
    twice = flops("policy.num_steps=4", "policy.k=2", "updates_per_rollout=2")
    assert twice["step"] == base["rollout"] + 2 * base["update"]
