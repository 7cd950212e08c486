"""The full T-step edit loop: ours (one jitted `lax.scan`) vs diffusers' `QwenImageEditPipeline`, CPU.

    python -m cogniedit_jax.bench.edit_loop [--layers 4 --dim 512 --heads 4 --side 256 --txt 64 --batch 1
                                             --steps 10 --cfg 4.0 --repeats 3] [--json PATH]

Same random transformer on both sides (saved, converted and loaded through the real path), the real
scheduler config, prompt embeddings passed in (no text encoder), true CFG on by default. The pipeline runs
end to end with `output_type="latent"`, so its time includes the VAE encoding of the source image: a tiny
VAE whose encode time is measured apart and reported (it is small next to the loop). The source is
resized to --side x --side pixels (the pipeline's one-megapixel rule shrunk by `source_area`), the output
is --side x --side too: 2 x (side / 16)^2 image tokens per model call.

Times are medians of --repeats rounds after a warm-up, the two sides taking turns; see bench/mmdit.py for
the effect of other processes on the same cores (reported at the end).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cogniedit_jax.bench.mmdit import (
    add_model_args,
    OtherLoad,
    bench_config,
    compile_timed,
    cpu_name,
    interleaved,
    random_diffusers_model,
    rel_err,
)
from cogniedit_jax.bench.reference import edit_pipeline, recorded_source_latents, source_area
from cogniedit_jax.models import load_transformer
from cogniedit_jax.models.conversion import convert_transformer
from cogniedit_jax.sampling.edit_loop import EditCondition, edit_latents, edit_layout
from cogniedit_jax.sampling.schedule import SchedulerConfig, make_schedule


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(ap)
    ap.add_argument("--side", type=int, default=256, help="source and output side in pixels (multiple of 16)")
    ap.add_argument("--txt", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=4.0, help="true CFG scale (<= 1: no CFG)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.side % 16:
        ap.error(f"--side {args.side}: must be a multiple of 16")

    import torch
    from diffusers import AutoencoderKLQwenImage
    from PIL import Image

    torch.set_num_threads(args.threads)
    base = bench_config(args.layers, args.dim, args.heads, args.joint_dim)
    model = random_diffusers_model(base, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "diffusers")
        convert_transformer(Path(tmp) / "diffusers", Path(tmp) / "converted", progress=False)
        cfg, params = load_transformer(Path(tmp) / "converted")
    torch.manual_seed(args.seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=cfg.in_channels // 4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        latents_mean=[0.0] * 16,
        latents_std=[1.0] * 16,
    ).eval()
    pipe = edit_pipeline(model, vae)

    g = torch.Generator().manual_seed(args.seed)
    tokens = (args.side // 16) ** 2
    embeds = torch.randn(args.batch, args.txt, cfg.joint_attention_dim, generator=g)
    mask = torch.ones(args.batch, args.txt, dtype=torch.long)
    neg = torch.randn(args.batch, 8, cfg.joint_attention_dim, generator=g)
    neg_mask = torch.ones(args.batch, 8, dtype=torch.long)
    use_cfg = args.cfg > 1
    noise = torch.randn(args.batch, tokens, cfg.in_channels, generator=g)
    source = Image.fromarray(
        np.random.default_rng(args.seed).integers(0, 256, (args.side, args.side, 3), np.uint8)
    )

    def diffusers_edit():
        with torch.no_grad():
            return pipe(
                image=source,
                prompt_embeds=embeds,
                prompt_embeds_mask=mask,
                negative_prompt_embeds=neg if use_cfg else None,
                negative_prompt_embeds_mask=neg_mask if use_cfg else None,
                true_cfg_scale=args.cfg,
                height=args.side,
                width=args.side,
                num_inference_steps=args.steps,
                latents=noise,
                output_type="latent",
            ).images

    def vae_encode():
        with torch.no_grad():
            return pipe.vae.encode(torch.zeros(1, 3, 1, args.side, args.side)).latent_dist.mean

    with source_area(args.side * args.side):
        with recorded_source_latents(model, tokens) as seen:
            expected = diffusers_edit().numpy()
        j = lambda t: jnp.asarray(t.numpy())  # noqa: E731
        cond = EditCondition(
            j(embeds),
            j(mask),
            j(seen["source"]),
            j(neg) if use_cfg else None,
            j(neg_mask) if use_cfg else None,
        )
        layout = edit_layout((args.side // 8,) * 2, [(args.side // 8,) * 2])
        sigmas, _ = make_schedule(SchedulerConfig(), args.steps, tokens)
        ours, compile_s = compile_timed(
            functools.partial(edit_latents, cfg, layout=layout, cfg_scale=args.cfg),
            params,
            j(noise),
            cond,
            sigmas,
        )
        err = rel_err(ours(params, j(noise), cond, sigmas), expected)
        other = OtherLoad()
        times = interleaved(
            {
                "diffusers": diffusers_edit,
                "diffusers VAE encode": vae_encode,
                "ours": lambda: ours(params, j(noise), cond, sigmas).block_until_ready(),
            },
            args.repeats,
            warmup=1,
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    loop_ref = med["diffusers"] - med["diffusers VAE encode"]
    calls = args.steps * (2 if use_cfg else 1)
    threads = torch.get_num_threads()
    print(f"cpu: {cpu_name()}, torch {torch.__version__} ({threads} threads), jax {jax.__version__}")
    guidance = args.cfg if use_cfg else "off"
    print(
        f"model: {cfg.num_layers} layers, {cfg.num_attention_heads} x {cfg.attention_head_dim}; "
        f"batch {args.batch}, {2 * tokens} image + {args.txt} text tokens, {args.steps} steps, "
        f"true CFG {guidance} ({calls} transformer passes per row)"
    )
    vae_s = med["diffusers VAE encode"]
    print(f"diffusers pipeline   {med['diffusers']:.3f} s  (of which VAE encode {vae_s:.3f} s)")
    print(f"ours (jit, one scan) {med['ours']:.3f} s  (compile {compile_s:.1f} s, once)")
    print(f"ratio (diffusers loop without VAE / ours) {loop_ref / med['ours']:.2f}  (> 1: ours faster)")
    print(f"sanity: final latents max|ours - diffusers| / max|diffusers| = {err:.2e}")
    cores = other.cores()
    if cores is not None:
        print(f"other processes used {cores:.2f} cores on average during the timing")
    result = {
        "config": vars(args) | {"json": None},
        "diffusers_s": med["diffusers"],
        "diffusers_vae_encode_s": med["diffusers VAE encode"],
        "ours_s": med["ours"],
        "ours_compile_s": compile_s,
        "ratio": loop_ref / med["ours"],
        "rel_err": err,
        "other_cores": cores,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
