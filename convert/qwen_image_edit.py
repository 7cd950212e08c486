"""Convert a diffusers Qwen-Image-Edit checkpoint into cogniedit-jax's format.

    python convert/qwen_image_edit.py --transformer /ckpt/Qwen-Image-Edit/transformer --out /ckpt/qie-jax \
        --dtype bfloat16

Streams one tensor at a time (peak memory: about one tensor), checks every key and shape against the
model's table and reports all problems in one error. Load the result with
`cogniedit_jax.models.load_transformer(OUT)`.
"""

import argparse
import sys

from cogniedit_jax.models.conversion import convert_transformer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformer", required=True,
                        help="diffusers transformer folder: config.json + safetensors (single or sharded + index)")
    parser.add_argument("--out", required=True, help="output folder (transformer/ is written inside)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="cast to this dtype (default: keep the checkpoint's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = convert_transformer(args.transformer, args.out, args.dtype, progress=not args.no_progress)
    print(f"wrote {args.out}/transformer: {cfg.num_layers} layers, inner dim {cfg.inner_dim}, {cfg.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
