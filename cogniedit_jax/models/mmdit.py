"""Qwen-Image's dual-stream MMDiT (diffusers' `QwenImageTransformer2DModel`) as pure functions.

The model is a function of a parameter pytree (layout: `param_mapping`), so frozen weights, the LoRA
pytree and the token-focus pytree stay separate arguments and `jax.grad` can take any of them.
The blocks run in one `lax.scan` over the stacked block parameters, under `jax.checkpoint` with the
configured policy.

Precision: activations and matmuls in `cfg.dtype`; LayerNorm/RMSNorm statistics, RoPE, softmax and
the sinusoidal timestep features in fp32, as diffusers does for bf16.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cogniedit_jax.models import param_mapping, token_focus
from cogniedit_jax.models.config import MMDiTConfig, at_least_f32
from cogniedit_jax.models.rope import apply_rope, normalize_img_shapes, rope_tables

_REMAT = {
    "full": None,  # jax.checkpoint's default: save nothing, recompute the block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _sub(tree, *keys):
    """tree[k1][k2]..., or None where any level is absent (modules without LoRA)."""
    for k in keys:
        if tree is None:
            return None
        tree = tree.get(k)
    return tree


def linear(p, x, lora=None, lora_scale=1.0):
    """x @ kernel + bias, plus the unmerged LoRA path scale * (x @ A) @ B."""
    y = jnp.einsum("...i,io->...o", x, p["kernel"].astype(x.dtype)) + p["bias"].astype(x.dtype)
    if lora is not None:
        y = y + jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x, lora["a"].astype(x.dtype)),
                           lora["b"].astype(x.dtype)) * jnp.asarray(lora_scale, x.dtype)
    return y


def layer_norm(x, eps):
    """LayerNorm without affine parameters; statistics in fp32."""
    x32 = x.astype(at_least_f32(x))
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(x, scale, eps):
    x32 = x.astype(at_least_f32(x))
    var = jnp.square(x32).mean(-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype) * scale.astype(x.dtype)


def timestep_features(timestep, dtype):
    """diffusers' `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)`.

    The timestep and the frequencies are rounded to the model dtype first, as diffusers does, so bf16
    runs see the same (coarse) timesteps as the reference.
    """
    half = 128
    t = timestep.astype(dtype)
    wide = at_least_f32(t)
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=wide) / half).astype(dtype)
    angles = 1000.0 * (t.astype(wide)[:, None] * freqs.astype(wide)[None, :])
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1).astype(dtype)


def _time_embedding(cfg, params, lora, scale, timestep, additional_t_cond, dtype):
    p = params["time_embed"]
    h = linear(p["linear_1"], timestep_features(timestep, dtype), _sub(lora, "time_embed", "linear_1"), scale)
    temb = linear(p["linear_2"], jax.nn.silu(h), _sub(lora, "time_embed", "linear_2"), scale)
    if cfg.use_additional_t_cond:
        if additional_t_cond is None:
            raise ValueError("use_additional_t_cond=True: pass additional_t_cond (int [B] in {0, 1})")
        temb = temb + p["addition_t_embedding"]["embedding"].astype(dtype)[additional_t_cond]
    return temb


def _modulation(p, lora, scale, temb):
    """AdaLN parameters [B, 1, 6, D]: shift1, scale1, gate1, shift2, scale2, gate2."""
    mod = linear(p, jax.nn.silu(temb), lora, scale)
    return mod.reshape(mod.shape[0], 1, 6, -1)


def _gelu_tanh(x):
    return jax.nn.gelu(x.astype(at_least_f32(x)), approximate=True).astype(x.dtype)


def _heads(x, head_dim):
    return x.reshape(*x.shape[:-1], -1, head_dim)


def _attention(cfg, q, k, v, mask):
    if q.dtype == jnp.float64:
        # jax.nn.dot_product_attention takes its logits in fp32 whatever the input dtype; fp64 runs (finite-
        # difference tests) need every op in fp64.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    impl = None if cfg.attention_impl == "xla" else cfg.attention_impl
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def block_forward(cfg, p, lora, scale, img, txt, temb, mask, rope, img_is_target, attend=None):
    """One dual-stream block. img [B, S, D], txt [B, L, D]; temb [B, D] (or a pair for zero_cond_t).

    img_is_target: None, or bool [B, S, 1] (zero_cond_t: condition-image tokens use the t=0 modulation).
    attend: None (the configured attention), or a function (q, k, v, mask) -> out over the joint sequence
    (text first), [B, T, H, hd] each: how analyses look at the attention without a second model.
    """
    (img_cos, img_sin), (txt_cos, txt_sin) = rope
    hd = cfg.attention_head_dim
    if img_is_target is None:
        img_mod = _modulation(p["img_mod"], _sub(lora, "img_mod"), scale, temb)
        txt_mod = _modulation(p["txt_mod"], _sub(lora, "txt_mod"), scale, temb)
    else:
        temb_t, temb_0 = temb
        img_mod = jnp.where(img_is_target[..., None],
                            _modulation(p["img_mod"], _sub(lora, "img_mod"), scale, temb_t),
                            _modulation(p["img_mod"], _sub(lora, "img_mod"), scale, temb_0))
        txt_mod = _modulation(p["txt_mod"], _sub(lora, "txt_mod"), scale, temb_t)

    def modulate(x, mod, first):
        shift, scl, gate = (mod[:, :, i] for i in ((0, 1, 2) if first else (3, 4, 5)))
        return layer_norm(x, cfg.eps) * (1 + scl) + shift, gate

    a = p["attn"]
    la = _sub(lora, "attn")
    img_x, img_gate = modulate(img, img_mod, True)
    txt_x, txt_gate = modulate(txt, txt_mod, True)

    def qkv(x, names, norms, cos, sin):
        q, k, v = (_heads(linear(a[n], x, _sub(la, n), scale), hd) for n in names)
        q = apply_rope(rms_norm(q, a[norms[0]]["scale"], cfg.eps), cos, sin)
        k = apply_rope(rms_norm(k, a[norms[1]]["scale"], cfg.eps), cos, sin)
        return q, k, v

    iq, ik, iv = qkv(img_x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), img_cos, img_sin)
    tq, tk, tv = qkv(txt_x, ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"),
                     txt_cos, txt_sin)
    out = (attend or functools.partial(_attention, cfg))(
        *(jnp.concatenate(pair, axis=1) for pair in ((tq, iq), (tk, ik), (tv, iv))), mask)
    out = out.reshape(*out.shape[:2], -1)
    n_txt = txt.shape[1]
    img = img + img_gate * linear(a["to_out"], out[:, n_txt:], _sub(la, "to_out"), scale)
    txt = txt + txt_gate * linear(a["to_add_out"], out[:, :n_txt], _sub(la, "to_add_out"), scale)

    def mlp(x, mod, name):
        h, gate = modulate(x, mod, False)
        h = _gelu_tanh(linear(p[name]["fc1"], h, _sub(lora, name, "fc1"), scale))
        return x + gate * linear(p[name]["fc2"], h, _sub(lora, name, "fc2"), scale)

    return mlp(img, img_mod, "img_mlp"), mlp(txt, txt_mod, "txt_mlp")


def transformer_forward(
    cfg: MMDiTConfig,
    params,
    hidden_states,
    encoder_hidden_states,
    encoder_hidden_states_mask,
    timestep,
    img_shapes: Sequence[Sequence[Sequence[int]]],
    lora=None,
    additional_t_cond=None,
    focus=None,
):
    """Same arguments and meaning as diffusers' `QwenImageTransformer2DModel.forward`.

    hidden_states [B, S, in_channels] (packed latents, target image first), encoder_hidden_states
    [B, L, joint_attention_dim], encoder_hidden_states_mask [B, L] (1 = valid token) or None,
    timestep [B] (sigma in [0, 1]), img_shapes[b] = [(frames, h, w), ...] summing to S.
    lora: a `lora.Lora` or None. focus: a `token_focus.Focus` (relocates the text stream entering each
    block, in its `mode`) or None (the model as released: the KL reference policy).
    Returns [B, S, patch_size**2 * out_channels] in cfg.dtype.
    Traceable: call it inside jit (img_shapes is static there).
    """
    return _forward(cfg, params, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
                    img_shapes, lora, additional_t_cond, focus, probe=None, record=False)[0]


def transformer_forward_with_records(cfg: MMDiTConfig, params, hidden_states, encoder_hidden_states,
                                     encoder_hidden_states_mask, timestep, img_shapes, lora=None,
                                     additional_t_cond=None, focus=None, probe=None):
    """`transformer_forward` plus per-layer records, stacked on a leading [num_layers] axis:
    records["focus"] = `token_focus.relocate`'s record (with a focus), records["probe"] = what
    `probe(q, k, v, mask)` returns for each block's joint attention inputs (with a probe; the block's
    output still comes from the configured attention). -> (output, records)."""
    return _forward(cfg, params, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
                    img_shapes, lora, additional_t_cond, focus, probe, record=True)


def _forward(cfg, params, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
             img_shapes, lora, additional_t_cond, focus, probe, record):
    dtype = cfg.compute_dtype
    batch, seq_img = hidden_states.shape[:2]
    txt_len = encoder_hidden_states.shape[1]
    shapes = normalize_img_shapes(img_shapes, batch)
    for b, row in enumerate(shapes):
        n = sum(f * h * w for f, h, w in row)
        if n != seq_img:
            raise ValueError(f"img_shapes[{b}] = {row} covers {n} tokens, hidden_states has {seq_img}")
    lora_tree, scale = (None, 1.0) if lora is None else (lora.params, lora.scale)

    img = linear(params["img_in"], hidden_states.astype(dtype), _sub(lora_tree, "img_in"), scale)
    txt = rms_norm(encoder_hidden_states.astype(dtype), params["txt_norm"]["scale"], cfg.eps)
    txt = linear(params["txt_in"], txt, _sub(lora_tree, "txt_in"), scale)

    timestep = jnp.broadcast_to(jnp.asarray(timestep), (batch,))
    temb = _time_embedding(cfg, params, lora_tree, scale, timestep, additional_t_cond, dtype)
    img_is_target = None
    if cfg.zero_cond_t:
        # The source-image tokens are modulated as if clean (t = 0), the target tokens with t.
        temb = (temb, _time_embedding(cfg, params, lora_tree, scale, timestep * 0, additional_t_cond, dtype))
        img_is_target = jnp.asarray(np.array([[i < f * h * w for i in range(seq_img)]
                                              for (f, h, w), *_ in shapes])[..., None])

    mask = None
    if encoder_hidden_states_mask is not None:
        keep = jnp.concatenate([encoder_hidden_states_mask.astype(bool), jnp.ones((batch, seq_img), bool)], 1)
        mask = keep[:, None, None, :]
    rope = jax.tree.map(jnp.asarray, rope_tables(cfg, shapes, txt_len))

    focus_tree = focus_layout = None
    if focus is not None:
        token_focus.check_focus(cfg, focus)
        focus_tree = focus.params
        focus_layout = token_focus.layout(encoder_hidden_states_mask, batch, txt_len, focus.xi)

    def body(carry, layer):
        p, lora_p, focus_p = layer
        img, txt = carry
        records, attend = {}, None
        if focus_p is not None:
            txt, records["focus"] = token_focus.relocate(focus_p, txt, focus_layout, focus.mode)
        if probe is not None:
            def attend(q, k, v, m):
                # Called while this body is traced: the probe's value leaves through the scan's outputs.
                records["probe"] = probe(q, k, v, m)
                return _attention(cfg, q, k, v, m)
        carry = block_forward(cfg, p, lora_p, scale, img, txt, temb, mask, rope, img_is_target, attend)
        return carry, (records if record else None)

    if cfg.remat_policy != "none":
        body = jax.checkpoint(body, policy=_REMAT[cfg.remat_policy])
    (img, txt), records = jax.lax.scan(body, (img, txt),
                                       (params["blocks"], _sub(lora_tree, "blocks"), focus_tree))

    temb_out = temb[0] if cfg.zero_cond_t else temb
    emb = linear(params["norm_out"], jax.nn.silu(temb_out), _sub(lora_tree, "norm_out"), scale)
    scale_shift = emb.reshape(batch, 1, 2, -1)  # norm_out chunks scale first, then shift
    img = layer_norm(img, cfg.eps) * (1 + scale_shift[:, :, 0]) + scale_shift[:, :, 1]
    return linear(params["proj_out"], img, _sub(lora_tree, "proj_out"), scale), records


def init_params(cfg: MMDiTConfig, key, dtype=None):
    """Random parameters in our layout (kernels ~ N(0, 1/in), biases 0, norm scales 1).

    For shapes (`jax.eval_shape(functools.partial(init_params, cfg), key)`) and models trained from scratch.
    """
    dtype = jnp.dtype(dtype or cfg.dtype)
    flat = {}
    for t, k in zip(param_mapping.tensors(cfg), jax.random.split(key, len(param_mapping.tensors(cfg)))):
        leaf = t.ours.rsplit("/", 1)[1]
        if leaf == "kernel":
            flat[t.ours] = jax.random.normal(k, t.shape, dtype) / math.sqrt(t.shape[-2])
        elif leaf == "embedding":
            flat[t.ours] = jax.random.normal(k, t.shape, dtype)
        else:
            flat[t.ours] = (jnp.ones if leaf == "scale" else jnp.zeros)(t.shape, dtype)
    return traverse_util.unflatten_dict(flat, sep="/")
