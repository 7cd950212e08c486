"""Our VAE against diffusers' `AutoencoderKLQwenImage`: same config, same weights, one process, CPU.

    python -m cogniedit_jax.bench.vae [--base-dim 32 --size 256 --batch 1 --repeats 3 --threads N]

A random diffusers VAE (the real architecture at width --base-dim; 96 is the real model) is saved with
`save_pretrained` and converted through the real path (`convert_vae` -> `load_vae`). Timed: encode (the
posterior mean) and decode of a --size^2 image, diffusers under `torch.no_grad()` vs ours under `jax.jit`
(compile time reported apart; ours as AOT-compiled executables). Each time is the median of --repeats
rounds after one warm-up round, all four taking turns within a round; the CPU time other processes took
meanwhile is reported (torch suffers far more than XLA from a busy core: trust runs where it is ~0).
Needs the `torch` extra.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax.numpy as jnp

from cogniedit_jax.bench.mmdit import OtherLoad, cpu_name, interleaved, rel_err
from cogniedit_jax.bench.reference import randomize_
from cogniedit_jax.models import load_vae, vae_decode, vae_encode
from cogniedit_jax.models.vae_mapping import convert_vae


def random_diffusers_vae(seed: int, **config):
    """A diffusers `AutoencoderKLQwenImage(**config)`, every parameter random, in eval mode. The decoder's
    last convolution is scaled down so that decoded images stay mostly inside the [-1, 1] clamp (a
    comparison of clamped values would test the clamp, not the network)."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    model = randomize_(AutoencoderKLQwenImage(**config), seed).eval()
    with torch.no_grad():
        for p in model.decoder.conv_out.parameters():
            p.mul_(0.2)
    return model


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dim", type=int, default=32)
    parser.add_argument("--size", type=int, default=256, help="image height and width (multiple of 8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = random_diffusers_vae(0, base_dim=args.base_dim)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/diffusers")
        convert_vae(f"{tmp}/diffusers", f"{tmp}/converted", progress=False)
        cfg, params = load_vae(f"{tmp}/converted")
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.rand(args.batch, 3, 1, args.size, args.size) * 2 - 1
    latent = args.size // cfg.spatial_compression_ratio
    z = torch.randn(args.batch, cfg.z_dim, 1, latent, latent)
    x_jax, z_jax = jnp.asarray(x[:, :, 0].numpy()), jnp.asarray(z[:, :, 0].numpy())

    start = time.perf_counter()
    encode = vae_encode.lower(cfg, params, x_jax).compile()
    decode = vae_decode.lower(cfg, params, z_jax).compile()
    compile_s = time.perf_counter() - start

    other = OtherLoad()
    with torch.no_grad():
        times = interleaved({
            "diffusers encode": lambda: model.encode(x).latent_dist.mean,
            "ours encode": lambda: encode(params, x_jax).block_until_ready(),
            "diffusers decode": lambda: model.decode(z).sample,
            "ours decode": lambda: decode(params, z_jax).block_until_ready(),
        }, args.repeats, warmup=1)
        errors = {"encode": rel_err(encode(params, x_jax), model.encode(x).latent_dist.mean[:, :, 0].numpy()),
                  "decode": rel_err(decode(params, z_jax), model.decode(z).sample[:, :, 0].numpy())}
    other_cores = other.cores()

    print(f"VAE base_dim {args.base_dim} ({n_params / 1e6:.1f}M params), fp32, batch {args.batch}, "
          f"{args.size}x{args.size}, {cpu_name()}, torch threads {args.threads}; our compile {compile_s:.1f} s")
    print(f"{'case':<8} {'diffusers s':>12} {'ours s':>8} {'ratio':>6} {'rel err':>8}")
    median = {name: statistics.median(t) for name, t in times.items()}
    for case in ("encode", "decode"):
        t, o = median[f"diffusers {case}"], median[f"ours {case}"]
        print(f"{case:<8} {t:>12.3f} {o:>8.3f} {t / o:>6.2f} {errors[case]:>8.1e}")
    t, o = median["diffusers encode"] + median["diffusers decode"], median["ours encode"] + median["ours decode"]
    print(f"{'total':<8} {t:>12.3f} {o:>8.3f} {t / o:>6.2f}  (ratio = diffusers / ours)")
    if other_cores is not None:
        print(f"other processes used {other_cores:.2f} cores on average during the timed runs")


if __name__ == "__main__":
    main()
