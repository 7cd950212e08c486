"""What the token focus costs: the MMDiT with and without it, same weights and inputs, one process, CPU.

    python -m cogniedit_jax.bench.token_focus [--layers 4 --dim 512 --heads 4 --img 512 --txt 256 --batch 2
                                               --xi 64 --repeats 9] [--json PATH]

A random real-shaped model (64 latent channels), a focus with an open gate (0.5: a trained one), inputs
as in `bench.mmdit` (target + condition image, every other text row padded to 3/4). Cases, each pair timed
in turns (median of --repeats after --warmup, AOT-compiled executables):
- forward: no focus vs the focus in inference mode (hard window), the acceptance figure (<= 5 %);
- forward+backward w.r.t. LoRA (rank 16, attention projections) vs w.r.t. LoRA + focus in training mode
  (straight-through), loss = mean(out**2), default remat.
Wall time and this process's CPU time are both reported. On cores shared with other processes, run XLA on
one thread (XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1") and read the
CPU-time figure: it then counts our work and not the time spent descheduled.

Analytic focus FLOPs per block: predictor 2*B*L*d*r, window scores 2*B*L^2, replacement 2*B*L*xi*d (the
hard window is applied as a one-hot matrix, so inference pays the same as training). Against ~24*B*T*d^2 +
4*B*T^2*d for the block (T = S + L), this is well under 1 % at any size; what is measured on top is the
elementwise work and the per-block launch of a few more small kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from cogniedit_jax.bench.mmdit import (
    OtherLoad,
    add_model_args,
    bench_config,
    compile_timed,
    cpu_name,
    flops,
    image_layout,
    interleaved,
)
from cogniedit_jax.models.lora import DEFAULT_TARGETS, Lora, LoraConfig, init_lora
from cogniedit_jax.models.mmdit import init_params, transformer_forward
from cogniedit_jax.models.token_focus import FocusConfig, init_focus


def _cpu_timed(fn):
    """(fn recording this process's CPU seconds per call, that record). On shared cores, CPU time is what
    other processes' load distorts least (wall time counts the time we are descheduled)."""
    record = []

    def timed():
        t0 = time.process_time()
        fn()
        record.append(time.process_time() - t0)
    return timed, record


def focus_flops(cfg, batch: int, txt: int, xi: int, predictor_dim: int) -> float:
    per_block = 2.0 * batch * txt * (cfg.inner_dim * predictor_dim + txt + xi * cfg.inner_dim)
    return cfg.num_layers * per_block


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--img", type=int, default=512, help="image tokens (target + condition image)")
    ap.add_argument("--txt", type=int, default=256, help="text tokens")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--xi", type=int, default=FocusConfig.xi)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    cfg = bench_config(args.layers, args.dim, args.heads, args.joint_dim)
    keys = jax.random.split(jax.random.key(0), 6)
    params = jax.jit(init_params, static_argnums=0)(cfg, keys[0])
    focus_cfg = FocusConfig(xi=args.xi)
    focus = init_focus(cfg, focus_cfg, keys[1])
    focus = focus.replace(params={**focus.params, "gate": jnp.full((cfg.num_layers,), 0.5)})
    lora = init_lora(cfg, LoraConfig(rank=args.rank, alpha=float(args.rank)), keys[2])
    lora = Lora(jax.tree.map(lambda a: a + 0.01, lora.params), lora.scale)
    mask = jnp.ones((args.batch, args.txt), jnp.int32).at[1::2, (3 * args.txt) // 4:].set(0)
    x = {"hidden_states": jax.random.normal(keys[3], (args.batch, args.img, cfg.in_channels)),
         "encoder_hidden_states": jax.random.normal(keys[4], (args.batch, args.txt, cfg.joint_attention_dim)),
         "encoder_hidden_states_mask": mask, "timestep": jnp.linspace(0.9, 0.2, args.batch)}
    img_shapes = [image_layout(args.img)] * args.batch

    def forward(params, focus, x):
        return transformer_forward(cfg, params, img_shapes=img_shapes, focus=focus, **x)

    def step(trainable, params, x):
        def loss(trainable):
            lora, focus = trainable
            out = transformer_forward(cfg, params, img_shapes=img_shapes, lora=lora, focus=focus, **x)
            return jnp.mean(jnp.square(out.astype(jnp.float32)))
        return jax.value_and_grad(loss)(trainable)

    other = OtherLoad()
    compiled, compile_s, calls = {}, {}, {}
    cases = {"forward": (forward, (params, None, x)),
             "forward + focus": (forward, (params, focus, x)),
             "fwd+bwd LoRA": (step, ((lora, None), params, x)),
             "fwd+bwd LoRA + focus": (step, ((lora, focus.training()), params, x))}
    for name, (fn, fn_args) in cases.items():
        compiled[name], compile_s[name] = compile_timed(fn, *fn_args)
        calls[name] = lambda c=compiled[name], a=fn_args: jax.block_until_ready(c(*a))
    times, cpu = {}, {}
    for pair in (("forward", "forward + focus"), ("fwd+bwd LoRA", "fwd+bwd LoRA + focus")):
        for name in pair:
            calls[name], cpu[name] = _cpu_timed(calls[name])
        times.update(interleaved({k: calls[k] for k in pair}, args.repeats, args.warmup))
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v[args.warmup:]) for k, v in cpu.items()}
    other_cores = other.cores()

    base = flops(cfg, args.batch, args.img, args.txt, args.rank, DEFAULT_TARGETS)["forward"]
    extra = focus_flops(cfg, args.batch, args.txt, args.xi, focus_cfg.predictor_dim)
    overhead = {clock: {"forward": m["forward + focus"] / m["forward"] - 1,
                        "forward_backward": m["fwd+bwd LoRA + focus"] / m["fwd+bwd LoRA"] - 1}
                for clock, m in (("wall", med), ("cpu", cpu_med))}
    print(f"cpu: {cpu_name()}; jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"model: {cfg.num_layers} layers, inner dim {cfg.inner_dim}, batch {args.batch}, {args.img} image "
          f"+ "
          f"{args.txt} text tokens, xi {args.xi}, fp32; median of {args.repeats} after {args.warmup} warm-up")
    for name in cases:
        print(f"  {name:<22} wall {med[name]:.4f} s (min {min(times[name]):.4f}, "
              f"max {max(times[name]):.4f}), "
              f"cpu {cpu_med[name]:.4f} s; compile {compile_s[name]:.1f} s")
    for clock, o in overhead.items():
        print(f"focus overhead ({clock} time): forward {100 * o['forward']:+.1f} %, forward+backward "
              f"{100 * o['forward_backward']:+.1f} %")
    print(f"analytic focus FLOPs: {100 * extra / base:.2f} % of the forward")
    if other_cores is not None:
        print(f"other processes used {other_cores:.2f} cores on average during the run")
    result = {"config": vars(args) | {"json": None}, "seconds": med, "cpu_seconds": cpu_med, "times": times,
              "overhead": overhead,
              "flops": {"forward": base, "focus": extra}, "compile_s": compile_s,
              "other_processes_cores": other_cores}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
