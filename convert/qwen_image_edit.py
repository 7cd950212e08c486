"""Convert a diffusers Qwen-Image-Edit checkpoint into cogniedit-jax's format.

    python convert/qwen_image_edit.py --transformer /ckpt/Qwen-Image-Edit/transformer \
        --vae /ckpt/Qwen-Image-Edit/vae --out /ckpt/qie-jax --dtype bfloat16

Streams one tensor at a time (peak memory: about one tensor), checks every key and shape against the
model's table and reports all problems in one error. --transformer and --vae are each optional (at least
one): they write OUT/transformer/ and OUT/vae/. Load the results with
`cogniedit_jax.models.load_transformer(OUT)` and `cogniedit_jax.models.load_vae(OUT)`.
"""

import argparse
import sys

from cogniedit_jax.models.conversion import convert_transformer
from cogniedit_jax.models.vae_mapping import convert_vae


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformer",
                        help="diffusers transformer folder: config.json + safetensors (single or sharded + index)")
    parser.add_argument("--vae", help="diffusers VAE folder (AutoencoderKLQwenImage), same layout")
    parser.add_argument("--out", required=True, help="output folder (transformer/ and vae/ are written inside)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="cast to this dtype (default: keep the checkpoint's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not (args.transformer or args.vae):
        parser.error("nothing to convert: pass --transformer SRC, --vae SRC or both")
    if args.transformer:
        cfg = convert_transformer(args.transformer, args.out, args.dtype, progress=not args.no_progress)
        print(f"wrote {args.out}/transformer: {cfg.num_layers} layers, inner dim {cfg.inner_dim}, {cfg.dtype}")
    if args.vae:
        vae = convert_vae(args.vae, args.out, args.dtype, progress=not args.no_progress)
        print(f"wrote {args.out}/vae: base dim {vae.base_dim}, z dim {vae.z_dim}, {vae.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
