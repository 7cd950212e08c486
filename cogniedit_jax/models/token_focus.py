"""Dynamic Token Focus Relocation (paper section 3.2, eqs. 5-6) as a pytree applied inside the block scan.

For every block i, the text-stream hidden states entering it, h_i [L, d], are scored by a light predictor
p_eta (a per-token MLP on LayerNorm'd states; a window's score is the mean of its tokens' scores). Over the
window starts pos in [0, L_valid - xi] it gives a distribution q_i(pos); the layer's soft tokens
s_i = E(i) [xi, d] then replace the window:

    h_i[pos + k] <- h_i[pos + k] + g_i * (s_i[k] - h_i[pos + k]),   k < xi            (eq. 6, gated)

g_i is a zero-initialised per-layer gate: at g = 1 this is the paper's replacement, at init (g = 0) the
editor's output is exactly unchanged, so a fresh focus starts from the pretrained policy (as LoRA's B = 0).

Windows live in "valid-token space": token j with mask 1 has rank r_j (its index among the valid tokens),
and a window covers ranks [pos, pos + w). Padding is never covered, whatever the mask's pattern; a row with
L_valid < xi gets one window of w = L_valid tokens (s_i[:L_valid]); a row without valid tokens is untouched.

The replacement is written as one matrix W [L, xi] per row, W[j, k] = q(r_j - k) for the windows that put
soft token k on token j, so all modes share one code path:
  - "hard" (inference): q = one-hot of the argmax; eta gets no gradient.
  - "expected": q = softmax; the expected replacement under the predicted distribution; exact gradients
    of a smoothed objective, but its forward differs from the hard policy that is sampled and deployed.
  - "straight_through": forward = the hard choice exactly, backward through the softmax.
The default training mode is "straight_through": Dense GRPO recomputes the rollout's steps under the
trained policy and needs the ratio to be exactly 1 at theta = theta_old; rollouts and inference use the
hard window, and only the straight-through forward equals it bit for bit (the expected mixture would make
every ratio != 1 and train a policy that is never run). Its gradient for eta is the (biased) softmax
surrogate; "expected" stays available for unbiased, smoother training of eta.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from cogniedit_jax.models.config import MMDiTConfig, at_least_f32

TRAIN_MODES = ("straight_through", "expected")
MODES = ("hard", *TRAIN_MODES)
WEIGHT_NAME = "focus.safetensors"
_METADATA_KEY = "focus_config"


@dataclasses.dataclass(frozen=True)
class FocusConfig:
    xi: int = 64  # soft tokens per layer = window length (the paper's xi)
    predictor_dim: int = 64  # hidden width of the per-token scoring MLP p_eta
    train_mode: str = "straight_through"  # see the module docstring for why this is the default
    soft_token_std: float = 0.02  # init scale of E(i); irrelevant to the output while the gate is 0

    def __post_init__(self):
        errors = []
        if self.xi < 1:
            errors.append(f"xi={self.xi}: expected >= 1")
        if self.predictor_dim < 1:
            errors.append(f"predictor_dim={self.predictor_dim}: expected >= 1")
        if self.train_mode not in TRAIN_MODES:
            errors.append(f"train_mode={self.train_mode!r}: expected one of {TRAIN_MODES}")
        if errors:
            raise ValueError("FocusConfig: " + "; ".join(errors))


@flax.struct.dataclass
class Focus:
    """The trainable focus pytree: params {"predictor": {"w1", "b1", "w2"}, "soft_tokens", "gate"}, each
    stacked on a leading [num_layers] axis like the blocks. `train` (static) picks `train_mode` over the
    hard inference choice; `focus.training()` is the same parameters in training mode."""

    params: dict
    train_mode: str = flax.struct.field(pytree_node=False, default="straight_through")
    train: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def mode(self) -> str:
        return self.train_mode if self.train else "hard"

    @property
    def xi(self) -> int:
        return self.params["soft_tokens"].shape[-2]

    def training(self, train: bool = True) -> Focus:
        return self.replace(train=train)


def init_focus(cfg: MMDiTConfig, focus_cfg: FocusConfig, key) -> Focus:
    """w1 ~ N(0, 1/d), b1 = 0, w2 ~ N(0, 1/r) (content-dependent windows from the start), E ~ N(0, std^2),
    gate = 0 (the model is exactly unchanged). fp32."""
    n, d, r = cfg.num_layers, cfg.inner_dim, focus_cfg.predictor_dim
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "predictor": {"w1": jax.random.normal(k1, (n, d, r), jnp.float32) / np.sqrt(d),
                      "b1": jnp.zeros((n, r), jnp.float32),
                      "w2": jax.random.normal(k2, (n, r), jnp.float32) / np.sqrt(r)},
        "soft_tokens": focus_cfg.soft_token_std * jax.random.normal(k3, (n, focus_cfg.xi, d), jnp.float32),
        "gate": jnp.zeros((n,), jnp.float32),
    }
    return Focus(params, focus_cfg.train_mode)


def expected_shapes(cfg: MMDiTConfig, xi: int, predictor_dim: int) -> dict[str, tuple]:
    n, d = cfg.num_layers, cfg.inner_dim
    return {"predictor/w1": (n, d, predictor_dim), "predictor/b1": (n, predictor_dim),
            "predictor/w2": (n, predictor_dim), "soft_tokens": (n, xi, d), "gate": (n,)}


def check_focus(cfg: MMDiTConfig, focus: Focus, where: str = "focus") -> None:
    """One error naming every missing, unexpected and mis-shaped focus parameter for this model."""
    from cogniedit_jax.models.loading import check_tensors  # loading imports the model; keep it lazy

    if focus.train_mode not in TRAIN_MODES:
        raise ValueError(f"{where}: train_mode={focus.train_mode!r}, expected one of {TRAIN_MODES}")
    found = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(focus.params, sep="/").items()}
    # xi and the predictor width are the focus's own choice; the model fixes the rest.
    xi = (found.get("soft_tokens") or (0, 0))[-2:][0]
    width = (found.get("predictor/w2") or (0,))[-1]
    check_tensors(expected_shapes(cfg, xi, width), found,
                  f"{where} (num_layers={cfg.num_layers}, inner_dim={cfg.inner_dim})")


class Layout(NamedTuple):
    """Where windows may go, per batch row; depends only on the mask, so it is built once per forward."""

    start_ok: jax.Array  # bool [B, L]: pos is a window start (pos <= L_valid - w)
    window_mean: jax.Array  # f32 [B, L, L]: [pos, j] = 1/w where window pos covers token j
    source: jax.Array  # int [B, L, xi]: r_j - k, the window start that puts soft token k on token j
    covers: jax.Array  # bool [B, L, xi]: whether such a window exists (valid j, k < w, start in range)
    width: jax.Array  # int [B]: w = min(xi, L_valid)


def layout(mask, batch: int, txt_len: int, xi: int) -> Layout:
    """mask [B, L] (1 = valid token) or None (all valid)."""
    valid = jnp.ones((batch, txt_len), bool) if mask is None else jnp.asarray(mask).astype(bool)
    rank = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
    n_valid = valid.sum(1, dtype=jnp.int32)
    width = jnp.minimum(xi, n_valid)
    n_starts = n_valid - width + 1
    pos = jnp.arange(txt_len, dtype=jnp.int32)
    inside = (valid[:, None, :] & (rank[:, None, :] >= pos[None, :, None])
              & (rank[:, None, :] < pos[None, :, None] + width[:, None, None]))
    window_mean = inside / jnp.maximum(width, 1)[:, None, None].astype(jnp.float32)
    source = rank[:, :, None] - jnp.arange(xi, dtype=jnp.int32)
    covers = (valid[:, :, None] & (jnp.arange(xi) < width[:, None, None]) & (source >= 0)
              & (source < n_starts[:, None, None]))
    start_ok = pos[None, :] < n_starts[:, None]
    return Layout(start_ok, window_mean, jnp.clip(source, 0, txt_len - 1), covers, width)


def start_logits(layer, txt, lay: Layout):
    """p_eta: window-start logits [B, L] in (at least) fp32 (-inf where no window may start)."""
    p = layer["predictor"]
    h = jax.nn.standardize(txt.astype(at_least_f32(txt)), axis=-1, epsilon=1e-6)
    hidden = jax.nn.gelu(jnp.einsum("bld,dr->blr", h, p["w1"]) + p["b1"], approximate=True)
    token_scores = jnp.einsum("blr,r->bl", hidden, p["w2"])
    return jnp.where(lay.start_ok, jnp.einsum("bpj,bj->bp", lay.window_mean, token_scores), -jnp.inf)


def start_weights(logits, mode: str):
    """(q [B, L] as the mode uses it, softmax probabilities, argmax start)."""
    if mode not in MODES:
        raise ValueError(f"focus mode {mode!r}: expected one of {MODES}")
    probs = jax.nn.softmax(logits, axis=-1)
    start = jnp.argmax(logits, axis=-1)
    hard = jax.nn.one_hot(start, logits.shape[-1], dtype=probs.dtype)
    if mode == "hard":
        return hard, probs, start
    if mode == "expected":
        return probs, probs, start
    # (probs - stop_gradient(probs)) is exactly 0, so the forward equals the hard one bit for bit.
    return hard + (probs - jax.lax.stop_gradient(probs)), probs, start


def relocate(layer, txt, lay: Layout, mode: str):
    """Eq. 6 for one block: txt [B, L, d] -> (txt with the gated soft tokens in the window, record).

    record: {"start": argmax window start [B] (in valid-token ranks), "width": [B], "probs": [B, L]}.
    """
    q, probs, start = start_weights(start_logits(layer, txt, lay), mode)
    w = jnp.where(lay.covers, jax.vmap(lambda qb, ib: qb[ib])(q, lay.source), 0.0)  # [B, L, xi]
    h = txt.astype(at_least_f32(txt))
    delta = jnp.einsum("bjk,kd->bjd", w, layer["soft_tokens"]) - w.sum(-1, keepdims=True) * h
    out = txt + (layer["gate"] * delta).astype(txt.dtype)
    return out, {"start": start, "width": lay.width, "probs": probs}


def save_focus(focus: Focus, out_dir) -> Path:
    """`out_dir/focus.safetensors`: the params by path, with the train mode as metadata."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(focus.params), sep="/")
    flat = {k: np.asarray(v) for k, v in flat.items()}
    file = out_dir / WEIGHT_NAME
    save_file(flat, file, metadata={_METADATA_KEY: json.dumps({"train_mode": focus.train_mode})})
    return file


def load_focus(path, cfg: MMDiTConfig) -> Focus:
    """Read `save_focus`'s file (or a folder holding it), checked against the model's shapes."""
    path = Path(path)
    file = path / WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no focus file at {file}")
    with safe_open(file, "numpy") as f:
        meta = json.loads((f.metadata() or {}).get(_METADATA_KEY, "{}"))
        flat = {k: jnp.asarray(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
    focus = Focus(traverse_util.unflatten_dict(flat, sep="/"), meta.get("train_mode", "straight_through"))
    check_focus(cfg, focus, str(file))
    return focus
