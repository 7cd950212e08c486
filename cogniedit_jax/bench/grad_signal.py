"""How much of one training step's policy gradient is signal: the mean cosine between the gradients of
independent steps, at the initial trainable params.

    python -m cogniedit_jax.bench.grad_signal [--config configs/demo.py] [--batches 16] [--config.FIELD=VALUE ...]

Each of `batches` steps draws its own instances and rollout noise, is judged and differentiated exactly as
`train` does at step 0. If step i's gradient is g_i = s + n_i (a direction s every step shares, noise n_i
independent between steps, of equal expected size), the expected cosine between two steps is
|s|^2 / (|s|^2 + E|n|^2): the fraction of a step's gradient that is signal. Near 0, the optimizer moves mostly
at random and learning needs the average of ~1 / cosine steps; it tells, before a long run, whether a reward is
learnable at a batch size. Measured on the demo (24 steps of 4 x 8 samples): 0.007 +- 0.003 with the shapes
judge (-0.002 +- 0.002 with `rollout.shared_noise`), 0.046 +- 0.006 with a pixel-redness reward
(`judge.rule=pixel_stats`), on which training climbs within 60 steps.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from cogniedit_jax import config as config_lib, parallel, train
from cogniedit_jax.demo import run as demo_run


def pairwise_cosine(grads: np.ndarray) -> tuple[float, float]:
    """grads [n, P] (n >= 3) -> (mean cosine over the n (n - 1) / 2 pairs, its standard error: the spread of
    each row's mean cosine to the others over sqrt(n))."""
    grads = np.asarray(grads, np.float64)
    n = len(grads)
    if n < 3:
        raise ValueError(f"{n} gradients: need at least 3 for a cosine and its spread")
    unit = grads / np.maximum(np.linalg.norm(grads, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    cos = unit @ unit.T
    per_row = (cos.sum(1) - np.diag(cos)) / (n - 1)
    return float(cos[np.triu_indices(n, 1)].mean()), float(per_row.std(ddof=1) / np.sqrt(n))


def step_gradients(config, batches: int) -> tuple[np.ndarray, np.ndarray]:
    """The flattened loss gradients [batches, P] of `batches` independent training steps at the initial
    trainable params (`config.seed`), and each step's mean within-group reward std [batches]."""
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    editor = train.load_editor(config, mesh)
    conditions = iter(train.make_conditions(config, editor))
    judge, close_judge = train.make_judge(config)
    init_key, key = jax.random.split(jax.random.key(config.seed))
    trainable, _ = train.init_state(editor.cfg, config_lib.lora_config(config), config_lib.focus_config(config),
                                    train.OptimSpec.from_config(config), mesh, init_key)
    grad_of = jax.jit(train.loss_and_grad, static_argnums=0)
    grads, spreads = [], []
    try:
        for _ in range(batches):
            key, rollout_key = jax.random.split(key)
            sampled = train.judged_rollout(config, editor, judge, mesh, trainable, next(conditions), rollout_key)
            _, grad = grad_of(sampled.loss_cfg, trainable, editor.params, sampled.rollout)
            grads.append(np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad)]))
            spreads.append(float(np.mean(sampled.rewards.reshape(-1, config.rollout.group_size).std(1))))
    finally:
        close_judge()
    return np.stack(grads), np.array(spreads)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=demo_run.DEFAULT_CONFIG)
    ap.add_argument("--batches", type=int, default=16, help="independent training steps (>= 3)")
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown or args.batches < 3:
        ap.error(f"unknown arguments {unknown}" if unknown else f"--batches {args.batches}: need >= 3")
    config = config_lib.load_config(args.config, [a.removeprefix("--config.") for a in rest])
    config_lib.validate(config)
    grads, spreads = step_gradients(config, args.batches)
    cosine, sem = pairwise_cosine(grads)
    print(json.dumps({"batches": args.batches, "cosine": cosine, "cosine_sem": sem,
                      "within_group_reward_std": float(spreads.mean()),
                      "grad_norm": float(np.linalg.norm(grads, axis=1).mean())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
