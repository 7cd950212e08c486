"""Edit one image with one instruction:

    python -m cogniedit_jax.edit --config configs/base.py --image in.jpg --instruction "make the car red" \
        --out out.png [--steps 50 --seed 0 --cfg 4.0 --lora runs/train/export --encoder /ckpt/Qwen-Image-Edit]

The real model (`model.source="converted"`): the source is resized as the pipeline does (about one megapixel
at its aspect ratio, sides multiples of 16: `--target-area` to change), encoded by the Flax VAE, conditioned
through the sidecar's encoder (`--encoder DIR` or the config's `judge.sidecar.encoder`; spawned and shut down
here), and edited by the jitted ODE loop with true CFG (`--cfg`, the config's `policy.cfg_scale` by default).
`--editor module:fn` runs another editor, e.g. the embedded demo's: fn(config, lora, args) ->
edit_fn(images uint8 [B, H, W, 3], instructions) -> uint8 [B, H', W', 3] (the plug-in of
`python -m cogniedit_jax.eval`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cogniedit_jax.data.buckets import TARGET_AREA, edit_dimensions, resize_to
from cogniedit_jax.data.errors import DataError
from cogniedit_jax.data.images import load_rgb

log = logging.getLogger("cogniedit_jax.edit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cogniedit_jax.edit", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a config file (configs/X.py[:ARG])")
    p.add_argument("--image", required=True, type=Path, help="the source image")
    p.add_argument("--instruction", required=True)
    p.add_argument("--out", required=True, type=Path, help="the edited image (PNG)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (the pipeline's default: 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, help="true CFG scale (default: the config's policy.cfg_scale)")
    p.add_argument("--lora", help="the trainer's export folder (LoRA, and focus.safetensors when there)")
    p.add_argument("--target-area", type=int, default=TARGET_AREA, help="edit at about this many pixels")
    p.add_argument("--encoder", metavar="DIR", help="sidecar condition encoder: the Qwen-Image-Edit folder")
    p.add_argument("--editor", metavar="MODULE:FN", help="use this editor instead of the config's model")
    p.add_argument("--config-override", action="append", default=[], metavar="FIELD=VALUE")
    return p


def _encoder_client(config, args):
    from cogniedit_jax.sidecar.client import SidecarClient

    settings = dict(config.judge.sidecar)
    encoder = args.encoder or settings.get("encoder")
    if not settings.get("url") and not encoder:
        raise SystemExit(
            "the real model is conditioned through the sidecar's encoder: pass --encoder DIR (the "
            "Qwen-Image-Edit folder) or set judge.sidecar.encoder / judge.sidecar.url in the config"
        )
    settings.update(encoder=encoder, judge=None, rule_judge=None, decomposer=None, chat=None)
    settings.setdefault("spawn", "url" not in settings)
    return SidecarClient(settings)


def edit_image(config, args, image: np.ndarray) -> np.ndarray:
    """The edited image (uint8 [H, W, 3]) for one source (uint8, already at the edit size)."""
    from cogniedit_jax.config import resolve_plugin

    if args.editor:
        return resolve_plugin("--editor", args.editor)(config, args.lora, args)(
            image[None], [args.instruction]
        )[0]
    from cogniedit_jax.eval.editor import model_editor

    client = _encoder_client(config, args)
    edit_fn = model_editor(
        config, args.lora, client, args.steps, args.seed
    )  # loads and checks the model first
    client.start()
    try:
        return edit_fn(image[None], [args.instruction])[0]
    finally:
        client.close()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s edit %(levelname)s %(message)s"
    )
    from cogniedit_jax.config import load_config

    overrides = list(args.config_override) + (
        [f"policy.cfg_scale={args.cfg}"] if args.cfg is not None else []
    )
    config = load_config(args.config, overrides)
    if not args.instruction.strip():
        raise SystemExit("--instruction is empty")
    try:
        source = load_rgb(args.image)
    except DataError as e:
        raise SystemExit(str(e)) from None
    width, height = edit_dimensions(source.width, source.height, args.target_area)
    image = np.asarray(resize_to(source, width, height))
    log.info("source %s: %dx%d -> edit at %dx%d", args.image, source.width, source.height, width, height)
    t0 = time.perf_counter()
    edited = edit_image(config, args, image)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(edited).save(args.out)
    log.info(
        "wrote %s (%dx%d) in %.1f s", args.out, edited.shape[1], edited.shape[0], time.perf_counter() - t0
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
