"""Our MMDiT against diffusers' `QwenImageTransformer2DModel`: same config, same weights, one process, CPU.

    python -m cogniedit_jax.bench.mmdit [--layers 4 --dim 512 --heads 4 --img 512 --txt 64 --batch 2
                                         --rank 16 --repeats 5 --dtype float32] [--json PATH]

A random diffusers model is saved with `save_pretrained` and converted through the real path
(`convert_transformer` -> `load_transformer`), so both sides hold identical weights. Timed cases:

- forward: diffusers under `torch.no_grad()` vs ours under `jax.jit` (compile time reported apart);
- forward+backward w.r.t. a LoRA only (attention projections, base frozen), loss = mean(out**2):
  PEFT on the diffusers model vs `jax.jit(jax.value_and_grad(loss))` over our `Lora` pytree, with our
  default remat policy and with remat_policy="none". Both sides hold the same LoRA values.

Each time is the median of --repeats rounds after --warmup untimed ones, diffusers and ours taking turns
within a round; JAX results are waited for with `block_until_ready`, and ours run as AOT-compiled
executables (never recompiled). torch gets --threads intra-op threads (default: the usable cores); XLA's
CPU runtime uses all cores. The image tokens are a target image plus one condition image of equal size
(an edit), e.g. --img 512 = two 16x16 latent-patch grids; the text mask pads every other row to 3/4.

Other processes on the same cores distort the numbers, torch's far more than ours: its OpenMP team waits
at every parallel region for a thread the OS has descheduled (measured on 2 cores with one core busy
elsewhere: diffusers' forward 0.27 s -> 2.9 s with 2 threads, 0.6 s with 1; ours 0.25 -> ~0.5 s).
The run reports how much CPU other processes took meanwhile; trust runs where that is ~0.
Needs the `torch` extra (torch, diffusers, peft).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cogniedit_jax.bench.reference import random_diffusers_transformer
from cogniedit_jax.models import load_transformer, param_mapping, transformer_forward
from cogniedit_jax.models.config import MMDiTConfig
from cogniedit_jax.models.conversion import convert_transformer
from cogniedit_jax.models.lora import DEFAULT_TARGETS, Lora, LoraConfig, init_lora

# --- the diffusers side -------------------------------------------------------------------------------


def random_diffusers_model(cfg: MMDiTConfig, seed: int):
    return random_diffusers_transformer(seed, **cfg.to_diffusers())


def add_model_args(ap):
    """The model-size flags every benchmark shares; `bench_config(args.layers, args.dim, args.heads,
    args.joint_dim)` builds the config."""
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512, help="inner dim = heads * head dim")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--joint-dim", type=int, default=512, help="joint_attention_dim (text-encoder width)")


def bench_config(layers: int, dim: int, heads: int, joint_dim: int) -> MMDiTConfig:
    """A real-shaped (64 -> 16 channels) model of the given width and depth."""
    hd = dim // heads
    # diffusers' (16, 56, 56) at head dim 128; otherwise 1/8 for frames and the rest split evenly (all even).
    t_axis = max(2, (hd // 8) // 2 * 2)
    hw = (hd - t_axis) // 4 * 2
    axes = (16, 56, 56) if hd == 128 else (hd - 2 * hw, hw, hw)
    return MMDiTConfig(num_layers=layers, attention_head_dim=hd, num_attention_heads=heads,
                       joint_attention_dim=joint_dim, in_channels=64, out_channels=16, axes_dims_rope=axes)


def image_layout(tokens: int) -> list[tuple[int, int, int]]:
    """`tokens` image tokens as a target plus an equal condition image, each as square as divisors allow."""
    if tokens % 2:
        raise ValueError(f"--img {tokens}: must be even (target + condition image of equal size)")
    half = tokens // 2
    h = max(d for d in range(1, math.isqrt(half) + 1) if half % d == 0)
    return [(1, h, half // h)] * 2


def make_inputs(cfg: MMDiTConfig, batch: int, img_tokens: int, txt_tokens: int, seed: int, torch_dtype):
    import torch

    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, txt_tokens, dtype=torch.long)
    for b in range(1, batch, 2):
        mask[b, (3 * txt_tokens) // 4:] = 0  # every other row padded, as a real text batch is
    return {
        "hidden_states": torch.randn(batch, img_tokens, cfg.in_channels, generator=g).to(torch_dtype),
        "encoder_hidden_states": torch.randn(batch, txt_tokens, cfg.joint_attention_dim,
                                             generator=g).to(torch_dtype),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.linspace(0.9, 0.2, batch).to(torch_dtype),
        "img_shapes": [image_layout(img_tokens)] * batch,
    }


def to_jax(inputs: dict) -> tuple[dict, list]:
    """(array inputs as jnp arrays, img_shapes): img_shapes is static, the rest are jit arguments."""
    import torch

    arrays = {k: jnp.asarray(v.float().numpy() if v.is_floating_point() else v.numpy())
              for k, v in inputs.items() if torch.is_tensor(v)}
    return arrays, inputs["img_shapes"]


def torch_lora_modules(model):
    """(PEFT module name, LoRA Linear) for every adapted layer: 'transformer_blocks.3.attn.to_q', ..."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def add_torch_lora(model, lora: Lora, cfg: MMDiTConfig, rank: int, targets):
    """PEFT LoRA on `targets` with our `lora`'s values (A = a.T, B = b.T); everything else frozen."""
    import torch
    from peft import LoraConfig as PeftLoraConfig

    model.requires_grad_(False)
    # lora_alpha = r * our scale, so PEFT's scaling equals ours.
    model.add_adapter(PeftLoraConfig(r=rank, lora_alpha=rank * lora.scale, target_modules=list(targets),
                                     lora_dropout=0.0, init_lora_weights=True))
    mods = param_mapping.linear_modules(cfg)
    flat = traverse_util.flatten_dict(jax.device_get(lora.params), sep="/")
    dtype = next(model.parameters()).dtype
    n = 0
    with torch.no_grad():
        for name, m in torch_lora_modules(model):
            rest = name.split(".", 2)[2] if name.startswith("transformer_blocks.") else name
            index = int(name.split(".")[1]) if name.startswith("transformer_blocks.") else None
            ours = mods[rest].ours
            a, b = flat[f"{ours}/a"], flat[f"{ours}/b"]
            if index is not None:
                a, b = a[index], b[index]
            m.lora_A["default"].weight.copy_(torch.from_numpy(np.ascontiguousarray(a.T)).to(dtype))
            m.lora_B["default"].weight.copy_(torch.from_numpy(np.ascontiguousarray(b.T)).to(dtype))
            n += 1
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected = 2 * sum(cfg.num_layers if mods[t].stacked else 1 for t in resolve_names(cfg, targets))
    if n * 2 != expected or len(trainable) != expected:
        raise RuntimeError(f"PEFT adapted {n} modules / {len(trainable)} trainable tensors, expected "
                           f"{expected // 2} / {expected}")
    return model


def resolve_names(cfg, targets):
    mods = param_mapping.linear_modules(cfg)
    return sorted({n for t in targets for n in mods if n == t or n.endswith("." + t)})


# --- analytic FLOPs --------------------------------------------------------------------------------------

# Which token set each Linear runs on: the image tokens, the text tokens, or once per sample (the
# timestep embedding and the AdaLN modulations).
_PER_SAMPLE = ("time_text_embed.", "img_mod.", "txt_mod.", "norm_out.")
_TXT = ("txt_in", "attn.add_", "attn.to_add_out", "txt_mlp.")


def _rows(name: str, batch: int, img: int, txt: int) -> int:
    if name.startswith(_PER_SAMPLE):
        return batch
    if name.startswith(_TXT):
        return batch * txt
    return batch * img


def flops(cfg: MMDiTConfig, batch: int, img: int, txt: int, rank: int, targets) -> dict[str, float]:
    """Analytic matmul FLOPs (multiply-add = 2); elementwise work (norms, RoPE, softmax, GELU) not counted.

    linear    = sum over Linear modules of 2 * rows * d_in * d_out (* num_layers for block modules), rows =
                B*S (image-stream modules), B*L (text-stream), or B (timestep embedding, AdaLN modulations);
                ~ 2 * params_matmul * tokens.
    attention = num_layers * 4 * B * H * T^2 * hd, T = S + L (Q K^T and P V, 2 * T^2 * hd each per head).
    lora      = sum over adapted modules of 2 * rows * r * (d_in + d_out) (* num_layers).
    forward          = linear + attention            (the base model, no LoRA; the "forward" case)
    forward+backward = 2 * linear + 3 * attention + 3 * lora: the forward with LoRA, the activation
                       gradients (1x the linears, 2x attention: dP, dV, dQ, dK), and the LoRA weight
                       gradients (1x lora). Remat's recomputation is not counted (useful FLOPs only);
                       frozen weights get no gradient on either side.
    """
    mods = param_mapping.linear_modules(cfg)
    adapted = set(resolve_names(cfg, targets))
    linear = lora = 0.0
    for name, m in mods.items():
        times = cfg.num_layers if m.stacked else 1
        d_in, d_out = m.shape
        rows = _rows(name, batch, img, txt)
        linear += 2.0 * rows * d_in * d_out * times
        if name in adapted:
            lora += 2.0 * rows * rank * (d_in + d_out) * times
    tokens = img + txt
    attention = cfg.num_layers * 4.0 * batch * cfg.num_attention_heads * tokens**2 * cfg.attention_head_dim
    return {"linear": linear, "attention": attention, "lora": lora, "forward": linear + attention,
            "forward_backward": 2 * linear + 3 * attention + 3 * lora}


# --- timing -----------------------------------------------------------------------------------------------


def interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Wall times of each fn over `repeats` rounds, the fns taking turns within a round (after `warmup`
    untimed rounds), so a change in the machine's load (other processes on these cores) hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


class OtherLoad:
    """CPU time other processes spend while we run: /proc/stat's busy time of the whole machine minus this
    process's own, in cores (1.0 = one core fully taken). Linux; None elsewhere."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall, busy, own = (b - a for a, b in zip(self.start, end))
        return max(0.0, (busy - own) / wall)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| (max |ours| where ref is all zero)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    return float(np.abs(ours - ref).max() / scale if scale > 0 else np.abs(ours).max())


def compile_timed(fn, *args):
    """(compiled executable, seconds to trace+lower+compile). The AOT executable never recompiles."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--img", type=int, default=512, help="image tokens (target + condition image)")
    ap.add_argument("--txt", type=int, default=64, help="text tokens")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch intra-op threads (default: the cores this process may use)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)

    import diffusers
    import peft
    import torch

    torch.set_num_threads(args.threads)
    torch_dtype = getattr(torch, args.dtype)
    if args.dim % args.heads:
        ap.error(f"--dim {args.dim} is not a multiple of --heads {args.heads}")
    base = bench_config(args.layers, args.dim, args.heads, args.joint_dim)
    targets = tuple(t.removeprefix("attn.") for t in DEFAULT_TARGETS)

    cores = len(os.sched_getaffinity(0))
    print(f"cpu: {cpu_name()}, {cores} usable cores")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads; --threads, default the "
          f"usable cores), diffusers {diffusers.__version__}, peft {peft.__version__}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} (XLA's CPU runtime uses all cores), "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    other = OtherLoad()
    # --- one set of weights, through the real conversion path ----------------------------------------------
    model = random_diffusers_model(base, args.seed)
    if torch_dtype != torch.float32:
        model = model.to(torch_dtype)
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "diffusers")
        convert_transformer(Path(tmp) / "diffusers", Path(tmp) / "converted", dtype=args.dtype,
                            progress=False)
        cfg, params = load_transformer(Path(tmp) / "converted", dtype=args.dtype)
    print(f"model: {cfg.num_layers} layers, {cfg.num_attention_heads} heads x {cfg.attention_head_dim}, "
          f"axes_dims_rope {cfg.axes_dims_rope}, joint_attention_dim {cfg.joint_attention_dim}, "
          f"{n_params / 1e6:.1f}M params, {args.dtype}")
    inputs = make_inputs(cfg, args.batch, args.img, args.txt, args.seed, torch_dtype)
    jin, img_shapes = to_jax(inputs)
    print(f"inputs: batch {args.batch}, {args.img} image tokens {img_shapes[0]} + {args.txt} text tokens; "
          f"median of {args.repeats} after {args.warmup} warm-up calls, diffusers and ours taking turns")

    # --- forward ------------------------------------------------------------------------------------------
    def torch_forward():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    def our_forward(params, x):
        return transformer_forward(cfg, params, img_shapes=img_shapes, **x)

    ref = torch_forward().float().numpy()
    fwd, compile_fwd = compile_timed(our_forward, params, jin)
    err_fwd = rel_err(np.asarray(fwd(params, jin).astype(jnp.float32)), ref)
    times = interleaved({"diffusers": torch_forward, "ours": lambda: fwd(params, jin).block_until_ready()},
                        args.repeats, args.warmup)

    # --- forward+backward w.r.t. LoRA -------------------------------------------------------------------
    lora = init_lora(cfg, LoraConfig(rank=args.rank, alpha=float(args.rank)), jax.random.key(args.seed))
    # B = 0 at init: perturb it so the LoRA path carries signal (and its gradient w.r.t. A is non-zero).
    flat = traverse_util.flatten_dict(lora.params, sep="/")
    keys = jax.random.split(jax.random.key(args.seed + 1), len(flat))
    flat = {k: (0.02 * jax.random.normal(keys[i], v.shape, v.dtype) if k.endswith("/b") else v)
            for i, (k, v) in enumerate(sorted(flat.items()))}
    lora = Lora(traverse_util.unflatten_dict(flat, sep="/"), lora.scale)
    add_torch_lora(model, lora, cfg, args.rank, targets)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def torch_step():
        model.zero_grad(set_to_none=True)
        out = model(**inputs, return_dict=False)[0]
        loss = out.float().square().mean()
        loss.backward()
        return loss.detach()

    torch_loss = float(torch_step())
    # The last block's text-stream output is dead (the model returns the image stream): torch leaves its
    # `to_add_out` LoRA gradient None, ours is zero.
    torch_grads = {n: np.zeros(p.shape, np.float32) if p.grad is None else p.grad.float().numpy().copy()
                   for n, p in trainable}

    def make_loss(run_cfg):
        def loss(lora, params, x):
            y = transformer_forward(run_cfg, params, img_shapes=img_shapes, lora=lora, **x)
            return jnp.mean(jnp.square(y.astype(jnp.float32)))
        return jax.value_and_grad(loss)

    policies = [cfg.remat_policy] + (["none"] if cfg.remat_policy != "none" else [])
    mods = param_mapping.linear_modules(cfg)
    steps, backward = {}, {}
    for policy in policies:
        step, compile_s = compile_timed(make_loss(cfg.replace(remat_policy=policy)), lora, params, jin)
        value, grads = step(lora, params, jin)
        gflat = traverse_util.flatten_dict(jax.device_get(grads.params), sep="/")
        worst = 0.0
        for name, g in torch_grads.items():  # transformer_blocks.3.attn.to_q.lora_A.default.weight
            module, ab = name.split(".lora_")
            index = int(module.split(".")[1])
            ours = gflat[f"{mods[module.split('.', 2)[2]].ours}/{ab[0].lower()}"][index]
            worst = max(worst, rel_err(np.asarray(ours).T, g))
        steps[policy] = lambda step=step: jax.block_until_ready(step(lora, params, jin))
        backward[policy] = {"compile_s": compile_s, "grad_rel_err": worst,
                            "loss_rel_err": abs(float(value) - torch_loss) / abs(torch_loss)}
    steps = {"diffusers fwd+bwd": torch_step, **{f"ours fwd+bwd {p}": fn for p, fn in steps.items()}}
    times.update(interleaved(steps, args.repeats, args.warmup))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for p in policies:
        backward[p]["seconds"] = med[f"ours fwd+bwd {p}"]

    # --- report -------------------------------------------------------------------------------------------
    other_cores = other.cores()
    f = flops(cfg, args.batch, args.img, args.txt, args.rank, targets)
    rows = [("forward", med["diffusers"], med["ours"], f["forward"], compile_fwd)]
    rows += [(f"fwd+bwd LoRA r={args.rank}, remat={p}", med["diffusers fwd+bwd"], r["seconds"],
              f["forward_backward"], r["compile_s"]) for p, r in backward.items()]
    print()
    head = (f"{'case':<40} {'diffusers s':>11} {'ours s':>8} {'ratio':>6} {'GFLOP':>7} "
            f"{'diffusers GFLOP/s':>17} {'ours GFLOP/s':>12} {'ours compile s':>14}")
    print(head)
    print("-" * len(head))
    for case, td, to, fl, cs in rows:
        print(f"{case:<40} {td:>11.3f} {to:>8.3f} {td / to:>6.2f} {fl / 1e9:>7.1f} "
              f"{fl / td / 1e9:>17.1f} {fl / to / 1e9:>12.1f} {cs:>14.1f}")
    print("-" * len(head))
    print("ratio = diffusers s / ours s (> 1: ours faster); medians. GFLOP: analytic matmul FLOPs (linear "
          f"{f['linear'] / 1e9:.1f}, attention {f['attention'] / 1e9:.1f}, LoRA {f['lora'] / 1e9:.2f} per "
          "forward; fwd+bwd = 2 linear + 3 attention + 3 LoRA; remat's recompute not counted).")
    if other_cores is not None:
        print(f"other processes used {other_cores:.2f} of the {cores} cores on average during this run"
              + ("  WARNING: timings distorted by the sharing, diffusers' most (see the module docstring)"
                 if other_cores > 0.2 else ""))
    for name, ts in times.items():
        print(f"  {name:<28} median {statistics.median(ts):.3f}  min {min(ts):.3f}  max {max(ts):.3f}")
    print(f"sanity: forward max|ours - diffusers| / max|diffusers| = {err_fwd:.2e}")
    for p, r in backward.items():
        print(f"sanity: LoRA loss rel err {r['loss_rel_err']:.2e}, worst LoRA-gradient rel err "
              f"{r['grad_rel_err']:.2e} (remat={p})")

    result = {
        "config": {"layers": args.layers, "dim": args.dim, "heads": args.heads,
                   "head_dim": cfg.attention_head_dim,
                   "axes_dims_rope": list(cfg.axes_dims_rope), "joint_attention_dim": args.joint_dim,
                   "img_tokens": args.img, "txt_tokens": args.txt, "batch": args.batch, "rank": args.rank,
                   "dtype": args.dtype, "params": n_params, "repeats": args.repeats, "warmup": args.warmup},
        "env": {"cpu": cpu_name(), "cores": cores, "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(), "diffusers": diffusers.__version__,
                "peft": peft.__version__, "jax": jax.__version__, "backend": jax.devices()[0].platform,
                "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "flops": f,
        "forward": {"diffusers_s": med["diffusers"], "ours_s": med["ours"], "ours_compile_s": compile_fwd,
                    "rel_err": err_fwd},
        "forward_backward": {"diffusers_s": med["diffusers fwd+bwd"], "diffusers_loss": torch_loss,
                             "ours": backward},
        "times": times, "other_processes_cores": other_cores,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
