"""The demo editor: Qwen-Image-Edit's MMDiT at a tiny size, over pixel-space latents, with a word-level text
encoder for the shapes world's closed vocabulary. Edited exactly like the real model (`sampling.edit_loop`:
source latents after the target tokens, flow matching with sigma = t).

Latents: an RGB image in [-1, 1] is folded `fold` x `fold` into channels (space to depth; fold 2: 24x24x3 ->
12x12x12), the "latent" the pipeline's 2x2 packing then turns into tokens (fold 2: 36 tokens of 48 features,
one per 4x4 pixels, 2x2 tokens per grid cell; `edit_loop.pack_latents`). No VAE: decoding is exact, so the
judge sees what the model made. The model's width must stay well above the token's features: at sigma = 1
it has to carry the noise through (a 64-wide model on 108-feature tokens left its edits as noise).

Text: a token per word (0 = padding), its embedding plus a learned position embedding, zeros under the
padding, as the real condition encoder pads; [B, L, joint_attention_dim] and a mask, like `/encode` gives.

A saved editor is a folder: `transformer/` (what `models.load_transformer` reads), `text_encoder.safetensors`
and `demo.json` (image size, text length, vocabulary, and what pretraining measured).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from cogniedit_jax.data import shapes
from cogniedit_jax.models import MMDiTConfig, load_transformer
from cogniedit_jax.models.loading import CONFIG_NAME, PARAMS_NAME
from cogniedit_jax.sampling.edit_loop import (
    EditCondition,
    edit_latents,
    edit_layout,
    pack_latents,
    unpack_latents,
)
from cogniedit_jax.sampling.schedule import SchedulerConfig, make_schedule

WEIGHTS = Path(__file__).parent / "weights"
TEXT_NAME = "text_encoder.safetensors"
META_NAME = "demo.json"


# ---------------------------------------------------------------------------------------------- text

@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab: tuple[str, ...]
    max_len: int = 32
    dim: int = 64


def tokenize(text_cfg: TextConfig, instructions: list[str], length: int | None = None) -> np.ndarray:
    """Word ids [B, length] (default max_len), 0 = padding; an unknown word or an over-long instruction is
    refused by name."""
    length = length or text_cfg.max_len
    index = {w: i + 1 for i, w in enumerate(text_cfg.vocab)}
    ids = np.zeros((len(instructions), length), np.int32)
    for b, text in enumerate(instructions):
        words = shapes.instruction_words(text)
        unknown = sorted({w for w in words if w not in index})
        if unknown:
            raise ValueError(f"instruction {text!r}: words {unknown} are not in the demo editor's vocabulary")
        if len(words) > length:
            raise ValueError(f"instruction {text!r}: {len(words)} words, the text length is {length}")
        ids[b, :len(words)] = [index[w] for w in words]
    return ids


def init_text_params(text_cfg: TextConfig, key) -> dict:
    k1, k2 = jax.random.split(key)
    return {"embedding": jax.random.normal(k1, (len(text_cfg.vocab) + 1, text_cfg.dim)),
            "position": 0.1 * jax.random.normal(k2, (text_cfg.max_len, text_cfg.dim))}


def encode_text(text_params, ids):
    """ids [B, L] -> (embeds [B, L, D] with zeros under the padding, mask [B, L] int32)."""
    mask = (ids > 0).astype(jnp.int32)
    embeds = text_params["embedding"][ids] + text_params["position"][: ids.shape[1]]
    return embeds * mask[..., None], mask


# ---------------------------------------------------------------------------------------------- images

def images_to_latents(images, fold: int) -> jax.Array:
    """uint8 [B, H, W, 3] -> packed latents [B, (H/2f)(W/2f), 12 f^2] in [-1, 1]."""
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    b, h, w, c = x.shape
    if h % (2 * fold) or w % (2 * fold):
        raise ValueError(f"images of {h}x{w}: sides must be multiples of 2 x fold = {2 * fold}")
    x = x.reshape(b, h // fold, fold, w // fold, fold, c).transpose(0, 5, 2, 4, 1, 3)
    return pack_latents(x.reshape(b, c * fold * fold, h // fold, w // fold))


def latents_to_images(latents, size: int, fold: int) -> np.ndarray:
    """Inverse of `images_to_latents` (clipped, rounded): uint8 [B, size, size, 3]."""
    x = unpack_latents(jnp.asarray(latents, jnp.float32), size // fold, size // fold)
    b, c = x.shape[:2]
    x = x.reshape(b, c // (fold * fold), fold, fold, size // fold, size // fold).transpose(0, 4, 2, 5, 3, 1)
    x = x.reshape(b, size, size, c // (fold * fold))
    return np.asarray(jnp.round(jnp.clip((x + 1.0) * 127.5, 0, 255))).astype(np.uint8)


def model_config(fold: int, image_channels: int = 3, **arch) -> MMDiTConfig:
    """The demo MMDiT: `arch` overrides the architecture fields; channels follow from the pixel latents."""
    c = image_channels * fold * fold
    return MMDiTConfig(in_channels=4 * c, out_channels=c, **arch)


# ---------------------------------------------------------------------------------------------- editor

@dataclasses.dataclass(frozen=True)
class DemoEditor:
    """The frozen demo model: MMDiT (cfg, params), text encoder (text_cfg, text_params), the pixel latents'
    fold and image size, and `meta` (the pretraining recipe and its held-out measurements)."""

    cfg: MMDiTConfig
    params: dict
    text_cfg: TextConfig
    text_params: dict
    fold: int = 2
    image_size: int = shapes.IMAGE_SIZE
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return (self.image_size // self.fold,) * 2

    @property
    def layout(self):
        return edit_layout(self.latent_hw, [self.latent_hw])

    @property
    def image_tokens(self) -> int:
        return (self.image_size // (2 * self.fold)) ** 2

    def sigmas(self, steps: int) -> np.ndarray:
        return make_schedule(SchedulerConfig(), steps, self.image_tokens)[0]

    def condition(self, images, instructions: list[str]) -> EditCondition:
        """The edit condition of source images uint8 [B, H, W, 3] and instructions (no negative prompt:
        the demo runs without CFG)."""
        embeds, mask = encode_text(self.text_params, jnp.asarray(tokenize(self.text_cfg, instructions)))
        return EditCondition(embeds, mask, images_to_latents(images, self.fold))

    def edit(self, images, instructions: list[str], key, steps: int = 8, lora=None, focus=None) -> np.ndarray:
        """Deterministic (ODE) edits of source images uint8 [B, H, W, 3] -> uint8 [B, H, W, 3]."""
        cond = self.condition(images, instructions)
        noise = jax.random.normal(key, cond.source_latents.shape, jnp.float32)
        latents = _edit_latents(self.cfg, self.params, noise, cond, jnp.asarray(self.sigmas(steps)),
                                layout=self.layout, lora=lora, focus=focus)
        return latents_to_images(latents, self.image_size, self.fold)


_edit_latents = jax.jit(edit_latents, static_argnums=0, static_argnames="layout")


def save_editor(editor: DemoEditor, out) -> Path:
    out = Path(out)
    (out / "transformer").mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(editor.params, sep="/")
    save_file({k: np.asarray(v, np.float32) for k, v in flat.items()}, str(out / "transformer" / PARAMS_NAME))
    editor.cfg.replace(remat_policy="full").to_json(out / "transformer" / CONFIG_NAME)
    save_file({k: np.asarray(v, np.float32) for k, v in editor.text_params.items()}, str(out / TEXT_NAME))
    tc = editor.text_cfg
    text = {"max_len": tc.max_len, "dim": tc.dim, "vocab": list(tc.vocab)}
    meta = {"image_size": editor.image_size, "fold": editor.fold, "text": text,
            **{k: v for k, v in editor.meta.items() if k not in ("image_size", "fold", "text")}}
    (out / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, remat_policy: str) -> DemoEditor:
    folder = Path(path)
    if not (folder / META_NAME).is_file():
        raise FileNotFoundError(f"{folder / META_NAME} not found: is {folder} a folder written by "
                                "save_editor (python -m cogniedit_jax.demo.pretrain --out DIR)?")
    meta = json.loads((folder / META_NAME).read_text())
    text_cfg = TextConfig(tuple(meta["text"]["vocab"]), meta["text"]["max_len"], meta["text"]["dim"])
    text_params = {k: jnp.asarray(v) for k, v in load_file(str(folder / TEXT_NAME)).items()}
    expected = {"embedding": (len(text_cfg.vocab) + 1, text_cfg.dim),
                "position": (text_cfg.max_len, text_cfg.dim)}
    found = {k: tuple(v.shape) for k, v in text_params.items()}
    if found != expected:
        raise ValueError(f"{folder / TEXT_NAME}: tensors {found}, expected {expected} from {META_NAME}")
    cfg, params = load_transformer(folder, remat_policy=remat_policy)
    return DemoEditor(cfg, params, text_cfg, text_params, meta["fold"], meta["image_size"], meta)


def load_editor(path=None, remat_policy: str = "none") -> DemoEditor:
    """The editor saved in `path` (default: the shipped one, `cogniedit_jax/demo/weights`). Loaded once per
    process and path."""
    return _load_cached(str(Path(path or WEIGHTS).resolve()), remat_policy)
