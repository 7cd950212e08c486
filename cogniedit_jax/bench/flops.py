"""Training FLOPs, counted from the traced program: 2 M N K for every matrix product (`dot_general`) the
function runs, each scan body counted once per iteration.

XLA's cost analysis (and `jax.experimental.roofline`) count a loop body once whatever its trip count; our
transformer scans its layers and the sampler its steps, so they would report one layer of one step. Walking
the jaxpr is exact for matrix products, which are nearly all the work of a transformer; elementwise ops are
left out.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jex_core


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jex_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jex_core.Jaxpr):
                yield v


def _jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        elif name == "while":
            raise ValueError("matmul_flops: a while loop's trip count is unknown to the trace; use lax.scan")
        elif name == "cond":  # one branch runs: count the most expensive
            total += max(_jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            times = eqn.params["length"] if name == "scan" else 1
            total += times * sum(_jaxpr_flops(sub) for sub in _sub_jaxprs(eqn))
    return total


def matmul_flops(fn, *args, **kwargs) -> int:
    """Matrix-product FLOPs of one call of `fn(*args, **kwargs)`; arguments may be arrays or
    `jax.ShapeDtypeStruct`s (nothing runs)."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def training_step_flops(config) -> dict:
    """Matrix-product FLOPs of one training step of `config`, traced on its first batch: the rollout (B x G
    samples, T steps), one update (the k-step window re-run with gradient, its rematerialisation, the KL
    reference pass) and the step (rollout + `updates_per_rollout` updates)."""
    from cogniedit_jax import config as config_lib, parallel, train
    from cogniedit_jax.rl.rollout import sample_rollout

    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    editor = train.load_editor(config, mesh)
    batch = train.make_conditions(config, editor).global_batch(0)
    policy, sigmas, _ = train.batch_policy(config, editor.cfg, batch["layout"])
    loss_cfg = config_lib.loss_config(config, policy)
    optim = train.OptimSpec.from_config(config)
    trainable, _ = jax.eval_shape(
        lambda key: train.init_state(editor.cfg, config_lib.lora_config(config), config_lib.focus_config(config),
                                     optim, mesh, key), jax.random.key(0))

    def rollout_of(t, cond, key):
        return sample_rollout(policy, editor.params, t, cond, sigmas, key, config.rollout.group_size,
                              config.rollout.shared_noise)

    key = jax.random.key(0)
    rollout = matmul_flops(rollout_of, trainable, batch["cond"], key)
    shapes = jax.eval_shape(rollout_of, trainable, batch["cond"], key)
    update = matmul_flops(lambda t, r: train.loss_and_grad(loss_cfg, t, editor.params, r), trainable, shapes)
    return {"rollout": rollout, "update": update, "step": rollout + config.updates_per_rollout * update}
