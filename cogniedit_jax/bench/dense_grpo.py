"""Time and peak memory of one `value_and_grad(dense_grpo_loss)` as the window grows (k = 1, 2, 5, 10).

    python -m cogniedit_jax.bench.dense_grpo [--layers 4 --dim 512 --heads 4 --side 256 --txt 64
                                              --batch 1 --group 2 --ks 1,2,5,10 --repeats 3] [--json PATH]

A random real-shaped model (64 latent channels) of the given size, LoRA rank 4 on the attention
projections, true CFG (so each window step runs the model on 2 x batch x group rows, plus the reference
pass for the KL), a --side x --side pixel target and source (2 x (side/16)^2 image tokens), T = max(ks)
steps. Peak memory is XLA's own account of the compiled step (arguments + outputs + temporaries,
`compiled.memory_analysis()`), which is what bounds the batch on a GPU; time is the median wall time.
The goal: memory about flat in k (each step is rematerialised), time about linear in k.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import jax
import numpy as np

from cogniedit_jax.bench.mmdit import add_model_args, bench_config, compile_timed, cpu_name, interleaved
from cogniedit_jax.models.lora import LoraConfig, init_lora
from cogniedit_jax.models.mmdit import init_params
from cogniedit_jax.rl.dense_grpo import LossConfig, dense_grpo_loss
from cogniedit_jax.rl.policy import PolicyConfig, Trainable
from cogniedit_jax.rl.rollout import sample_rollout
from cogniedit_jax.sampling.edit_loop import EditCondition, edit_layout
from cogniedit_jax.sampling.schedule import SchedulerConfig, make_schedule


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(ap)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--txt", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--group", type=int, default=2)
    ap.add_argument("--ks", default="1,2,5,10")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]

    model = bench_config(args.layers, args.dim, args.heads, args.joint_dim)
    keys = jax.random.split(jax.random.key(0), 8)
    params = init_params(model, keys[0])
    lora = init_lora(model, LoraConfig(rank=4, alpha=4.0), keys[1])
    trainable = Trainable(lora=lora.replace(params=jax.tree.map(lambda a: a + 0.01, lora.params)))
    side = args.side // 8
    layout = edit_layout((side, side), [(side, side)])
    tokens = (side // 2) ** 2
    cond = EditCondition(
        jax.random.normal(keys[2], (args.batch, args.txt, model.joint_attention_dim)),
        np.ones((args.batch, args.txt), np.int32),
        jax.random.normal(keys[3], (args.batch, tokens, model.in_channels)),
        jax.random.normal(keys[4], (args.batch, 8, model.joint_attention_dim)),
        np.ones((args.batch, 8), np.int32),
    )
    steps = max(ks)
    sigmas, _ = make_schedule(SchedulerConfig(), steps, tokens)
    grad_fn = jax.value_and_grad(dense_grpo_loss, has_aux=True)

    print(f"cpu: {cpu_name()}; jax {jax.__version__} on {jax.devices()[0].platform}")
    print(
        f"model: {model.num_layers} layers x {model.num_attention_heads * model.attention_head_dim} wide; "
        f"{args.batch} x {args.group} samples, {2 * tokens} image + {args.txt} text tokens, true CFG + KL "
        f"reference pass, T = {steps}"
    )
    results = {}
    fns = {}
    for k in ks:
        policy = PolicyConfig(model, layout, num_steps=steps, k=k, cfg_scale=4.0)
        rollout = jax.jit(sample_rollout, static_argnums=(0, 6))(
            policy, params, trainable, cond, sigmas, keys[5], args.group
        )
        cfg = LossConfig(policy)
        compiled, compile_s = compile_timed(
            lambda t, p, r, cfg=cfg: grad_fn(t, p, r, cfg), trainable, params, rollout
        )
        fns[k] = lambda c=compiled, r=rollout: jax.block_until_ready(c(trainable, params, r))
        results[k] = {"peak_bytes": peak_bytes(compiled), "compile_s": compile_s}
    times = interleaved({k: fns[k] for k in ks}, args.repeats, warmup=1)
    base = results[ks[0]]
    print(
        f"{'k':>3} {'seconds':>8} {'s / k':>7} {'time vs k=' + str(ks[0]):>11} {'peak MiB':>9} "
        f"{'memory vs k=' + str(ks[0]):>13} {'compile s':>9}"
    )
    for k in ks:
        r = results[k]
        r["seconds"] = statistics.median(times[k])
        print(
            f"{k:>3} {r['seconds']:>8.3f} {r['seconds'] / k:>7.3f} "
            f"{r['seconds'] / statistics.median(times[ks[0]]):>11.2f} {r['peak_bytes'] / 2**20:>9.1f} "
            f"{r['peak_bytes'] / base['peak_bytes']:>13.2f} {r['compile_s']:>9.1f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"config": vars(args) | {"json": None}, "results": results}, indent=2)
        )
    return results


if __name__ == "__main__":
    main()
