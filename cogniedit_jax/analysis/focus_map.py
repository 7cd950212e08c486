"""Per layer, where the token focus puts its window and how much attention each instruction token gets
(the paper's Fig. 7): a PNG heat map and the numbers as JSON.

    python -m cogniedit_jax.analysis.focus_map --random-tiny --out DIR [--instruction TEXT --xi 3]
    python -m cogniedit_jax.analysis.focus_map --checkpoint CONVERTED --condition COND.npz \\
        [--focus FOCUS.safetensors] --out DIR [--sigma 0.6 --grid 32 32 --dtype bfloat16]

Writes DIR/focus_map.png and DIR/focus_map.json. The attention mass of a text token at a layer is the
softmax probability a target-image query puts on it, averaged over heads and target-image queries (the
generated image reading the instruction); the heat map scales each layer's row to its maximum, and a red
box marks the focus window (the hard choice the editor runs with).

COND.npz (a cached condition, as the condition encoder writes it for one instruction):
  prompt_embeds [L, D] or [1, L, D]; tokens [L] (str, one per position); mask [L] or [1, L] (optional, 1 =
  valid); source_latents [S, in_channels] packed 2x2 patches with source_grid = (h, w), h * w = S
  (optional: without them the source image is random latents on --grid).
The target latents are the source noised to --sigma (x = sigma * noise + (1 - sigma) * source), the input
of an edit's first steps. Memory: besides the forward, one layer's attention probabilities of the target
queries, [heads, target tokens, all tokens] in fp32, at a time. --random-tiny needs no files: a tiny random
model, random text states for the whitespace-split --instruction and a freshly initialised focus (its
windows are the untrained predictor's).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cogniedit_jax.models import MMDiTConfig, init_params, load_transformer
from cogniedit_jax.models.mmdit import transformer_forward_with_records
from cogniedit_jax.models.token_focus import FocusConfig, init_focus, load_focus

PNG_NAME, JSON_NAME = "focus_map.png", "focus_map.json"
TINY = MMDiTConfig(num_layers=6, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                   in_channels=16, out_channels=4, axes_dims_rope=(4, 6, 6))


def text_attention_probe(n_txt: int, n_queries: int):
    """probe(q, k, v, mask) -> [B, n_txt]: mean over heads and the first n_queries image queries (the target
    image) of their attention probabilities on each text token. Joint sequence = text, then image."""
    def probe(q, k, v, mask):
        qi = q[:, n_txt:n_txt + n_queries].astype(jnp.float32)
        logits = jnp.einsum("bqhd,bkhd->bhqk", qi, k.astype(jnp.float32)) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = jnp.where(mask, logits, -jnp.inf)
        return jax.nn.softmax(logits, axis=-1)[..., :n_txt].mean(axis=(1, 2))
    return probe


def _load_condition(path: Path, cfg: MMDiTConfig):
    """-> (embeds [1, L, D], mask [1, L], tokens [L], source latents [1, S, C] or None, grid or None)."""
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    missing = [k for k in ("prompt_embeds", "tokens") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing {missing} (found {sorted(data)})")
    embeds = data["prompt_embeds"].reshape(1, *data["prompt_embeds"].shape[-2:]).astype(np.float32)
    length, width = embeds.shape[1:]
    if width != cfg.joint_attention_dim:
        raise ValueError(f"{path}: prompt_embeds width {width}, the model's joint_attention_dim is "
                         f"{cfg.joint_attention_dim}")
    mask = data.get("mask", np.ones(length)).reshape(1, -1).astype(np.int32)
    tokens = [str(t) for t in data["tokens"].reshape(-1)]
    if mask.shape[1] != length or len(tokens) != length:
        raise ValueError(f"{path}: prompt_embeds has {length} positions, mask {mask.shape[1]}, "
                         f"tokens {len(tokens)}")
    source = data.get("source_latents")
    if source is None:
        return embeds, mask, tokens, None, None
    grid = tuple(int(v) for v in data.get("source_grid", ()))
    if len(grid) != 2 or grid[0] * grid[1] != source.shape[-2] or source.shape[-1] != cfg.in_channels:
        raise ValueError(f"{path}: source_latents {source.shape} need source_grid (h, w) with h*w = "
                         f"{source.shape[-2]} and {cfg.in_channels} channels; found source_grid {grid}")
    return embeds, mask, tokens, source.reshape(1, *source.shape[-2:]).astype(np.float32), grid


def _rounded(x):
    return np.round(np.asarray(x, np.float64), 6).tolist()


def analyse(cfg, params, embeds, mask, tokens, source, grid, focus, sigma: float, seed: int) -> dict:
    """One forward with records -> the numbers of the map (valid tokens only, in order)."""
    key_src, key_noise = jax.random.split(jax.random.key(seed))
    if source is None:
        source = jax.random.normal(key_src, (1, grid[0] * grid[1], cfg.in_channels))
    target = sigma * jax.random.normal(key_noise, source.shape) + (1 - sigma) * source
    img_shapes = [[(1, *grid), (1, *grid)]]
    n_txt = embeds.shape[1]
    probe = text_attention_probe(n_txt, grid[0] * grid[1])

    @jax.jit
    def run(params, focus, latents, embeds, mask):
        return transformer_forward_with_records(cfg, params, latents, embeds, mask, jnp.full((1,), sigma),
                                                img_shapes, focus=focus, probe=probe)[1]

    records = jax.device_get(run(params, focus, jnp.concatenate([target, source], 1), jnp.asarray(embeds),
                                 jnp.asarray(mask)))
    valid = np.flatnonzero(np.asarray(mask[0]))
    mass = np.asarray(records["probe"])[:, 0, valid]  # [layers, valid tokens]
    out = {"tokens": [tokens[j] for j in valid], "layers": cfg.num_layers, "sigma": sigma,
           "attention_mass": _rounded(mass), "text_attention_total": _rounded(mass.sum(1)),
           "focus": None, "windows": None}
    if focus is not None:
        rec = records["focus"]
        out["focus"] = {"xi": focus.xi, "mode": focus.mode,
                        "gate": _rounded(focus.params["gate"])}
        out["windows"] = []
        for layer in range(cfg.num_layers):
            start, width = int(rec["start"][layer, 0]), int(rec["width"][layer, 0])
            probs = np.asarray(rec["probs"][layer, 0])
            out["windows"].append({"layer": layer, "start": start, "width": width,
                                   "tokens": out["tokens"][start:start + width],
                                   "probability": round(float(probs[start]), 6),
                                   "start_probs": _rounded(probs[:len(valid) - width + 1])})
    return out


_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


def _colour(values):
    """[0, 1] -> RGB uint8 along viridis (5 anchors, linear between)."""
    x = np.clip(values, 0, 1) * (len(_VIRIDIS) - 1)
    lo = np.minimum(x.astype(int), len(_VIRIDIS) - 2)
    frac = (x - lo)[..., None]
    return ((1 - frac) * _VIRIDIS[lo] + frac * _VIRIDIS[lo + 1]).astype(np.uint8)


def render(result: dict, cell: tuple[int, int] = (18, 14), max_label: int = 18) -> Image.Image:
    """The heat map: a row per layer (scaled to its maximum), a column per token, windows boxed in red."""
    mass = np.asarray(result["attention_mass"], np.float64)
    layers, n = mass.shape
    font = ImageFont.load_default()
    labels = [t if len(t) <= max_label else t[:max_label - 1] + "…" for t in result["tokens"]]
    label_h = max([font.getbbox(t)[2] for t in labels] + [10]) + 6
    left, top, cw, ch = 36, label_h + 22, *cell
    title = "text attention per layer (row / row max); red: focus window"
    img = Image.new("RGB", (max(left + n * cw, font.getbbox(title)[2]) + 8, top + layers * ch + 8), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill="black", font=font)
    scaled = mass / np.maximum(mass.max(1, keepdims=True), 1e-30)
    cells = np.repeat(np.repeat(_colour(scaled), ch, 0), cw, 1)
    img.paste(Image.fromarray(cells), (left, top))
    for j, text in enumerate(labels):
        box = font.getbbox(text)
        tile = Image.new("RGB", (box[2] + 2, ch + 2), "white")
        ImageDraw.Draw(tile).text((1, 0), text, fill="black", font=font)
        rotated = tile.rotate(90, expand=True)
        img.paste(rotated, (left + j * cw + (cw - rotated.width) // 2, top - 4 - rotated.height))
    for i in range(layers):
        draw.text((4, top + i * ch), f"{i:>3}", fill="black", font=font)
    for w in result["windows"] or ():
        if w["width"]:
            x0, y0 = left + w["start"] * cw, top + w["layer"] * ch
            draw.rectangle([x0, y0, x0 + w["width"] * cw - 1, y0 + ch - 1], outline=(230, 20, 20), width=2)
    return img


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--random-tiny", action="store_true", help="a tiny random model (no files needed)")
    src.add_argument("--checkpoint", type=Path, help="a converted transformer folder")
    ap.add_argument("--condition", type=Path, help="cached condition .npz (with --checkpoint)")
    ap.add_argument("--focus", type=Path, help="focus file (save_focus); default: none (--checkpoint), fresh "
                    "(--random-tiny)")
    ap.add_argument("--instruction", default="Change the color of the purple eyes to red",
                    help="--random-tiny: tokens = its words")
    ap.add_argument("--xi", type=int, default=FocusConfig.xi, help="--random-tiny: the fresh focus's xi")
    ap.add_argument("--grid", type=int, nargs=2, default=(4, 4), metavar=("H", "W"),
                    help="latent patch grid of the (random) source and of the target")
    ap.add_argument("--sigma", type=float, default=0.6)
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="--checkpoint: run dtype")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    args = ap.parse_args(argv)

    grid, source = tuple(args.grid), None
    if args.random_tiny:
        k_text, k_focus = jax.random.split(jax.random.key(args.seed))
        # One compile rather than one per tensor, with the PRNG that compiles fastest (the weights are noise).
        cfg = TINY
        params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(args.seed, impl="unsafe_rbg"))
        tokens = args.instruction.split()
        embeds = jax.random.normal(k_text, (1, len(tokens), cfg.joint_attention_dim))
        mask = np.ones((1, len(tokens)), np.int32)
        focus = (load_focus(args.focus, cfg) if args.focus
                 else init_focus(cfg, FocusConfig(xi=args.xi), k_focus))
        where = "random-tiny"
    else:
        if args.condition is None:
            ap.error("--checkpoint needs --condition (a cached condition .npz)")
        cfg, params = load_transformer(args.checkpoint, **({"dtype": args.dtype} if args.dtype else {}))
        embeds, mask, tokens, source, src_grid = _load_condition(args.condition, cfg)
        grid = src_grid or grid
        focus = load_focus(args.focus, cfg) if args.focus else None
        where = str(args.checkpoint)

    result = analyse(cfg, params, embeds, mask, tokens, source, grid, focus, args.sigma, args.seed)
    result["model"] = where
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / JSON_NAME).write_text(json.dumps(result, ensure_ascii=False) + "\n")
    render(result).save(args.out / PNG_NAME)
    print(f"wrote {args.out / PNG_NAME} and {args.out / JSON_NAME}")
    return result


if __name__ == "__main__":
    main()
