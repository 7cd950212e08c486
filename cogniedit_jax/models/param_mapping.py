"""The one table between diffusers' `QwenImageTransformer2DModel` state dict and our parameter pytree.

The converter (diffusers -> ours), the loader's shape checks, `init_params`, and LoRA import/export
(PEFT module names <-> our paths) all read this table, so a name or layout lives in exactly one place.

Our layout: nested dicts, paths joined by "/"; the per-block parameters are stacked on a leading
`num_layers` axis under "blocks/"; Linear weights are stored as `kernel[in, out]` (torch keeps
`weight[out, in]`), norms as `scale`, embeddings as `embedding`.
"""

from __future__ import annotations

import dataclasses

from cogniedit_jax.models.config import MMDiTConfig

BLOCKS = "blocks"
BLOCK_PREFIX = "transformer_blocks.{i}."


@dataclasses.dataclass(frozen=True)
class Module:
    """One diffusers module and where its parameters go in our tree."""

    ours: str  # e.g. "blocks/attn/to_q"
    theirs: str  # e.g. "transformer_blocks.{i}.attn.to_q" ({i}: the block index)
    kind: str  # "linear" | "norm" | "embedding"
    shape: tuple[int, ...]  # linear: (in, out); norm: (dim,); embedding: (num, dim)

    @property
    def stacked(self) -> bool:
        return self.ours.startswith(BLOCKS + "/")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One of our leaves and the diffusers tensor it is made from."""

    ours: str  # "blocks/attn/to_q/kernel"
    theirs: str  # "transformer_blocks.{i}.attn.to_q.weight"
    shape: tuple[int, ...]  # our shape, stacked axis included
    transpose: bool  # torch Linear weight [out, in] -> our kernel [in, out]
    stacked: bool

    def their_shape(self) -> tuple[int, ...]:
        per_layer = self.shape[1:] if self.stacked else self.shape
        return tuple(reversed(per_layer)) if self.transpose else tuple(per_layer)

    def their_keys(self, num_layers: int) -> list[str]:
        if not self.stacked:
            return [self.theirs]
        return [self.theirs.format(i=i) for i in range(num_layers)]


def modules(cfg: MMDiTConfig) -> list[Module]:
    d, j, hd = cfg.inner_dim, cfg.joint_attention_dim, cfg.attention_head_dim
    mods = [
        Module("time_embed/linear_1", "time_text_embed.timestep_embedder.linear_1", "linear", (256, d)),
        Module("time_embed/linear_2", "time_text_embed.timestep_embedder.linear_2", "linear", (d, d)),
        Module("txt_norm", "txt_norm", "norm", (j,)),
        Module("img_in", "img_in", "linear", (cfg.in_channels, d)),
        Module("txt_in", "txt_in", "linear", (j, d)),
        Module("norm_out", "norm_out.linear", "linear", (d, 2 * d)),
        Module("proj_out", "proj_out", "linear", (d, cfg.out_features)),
    ]
    if cfg.use_additional_t_cond:
        mods.append(Module("time_embed/addition_t_embedding", "time_text_embed.addition_t_embedding",
                           "embedding", (2, d)))
    block = [
        ("img_mod", "img_mod.1", "linear", (d, 6 * d)),
        ("txt_mod", "txt_mod.1", "linear", (d, 6 * d)),
        *[(f"attn/{n}", f"attn.{n}", "linear", (d, d))
          for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")],
        ("attn/to_out", "attn.to_out.0", "linear", (d, d)),
        *[(f"attn/{n}", f"attn.{n}", "norm", (hd,))
          for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")],
        *[(f"{s}_mlp/fc1", f"{s}_mlp.net.0.proj", "linear", (d, 4 * d)) for s in ("img", "txt")],
        *[(f"{s}_mlp/fc2", f"{s}_mlp.net.2", "linear", (4 * d, d)) for s in ("img", "txt")],
    ]
    mods += [Module(f"{BLOCKS}/{ours}", BLOCK_PREFIX + theirs, kind, shape) for ours, theirs, kind, shape in block]
    return mods


def tensors(cfg: MMDiTConfig) -> list[Tensor]:
    """Every leaf of our parameter tree, in a fixed order."""
    out = []
    for m in modules(cfg):
        lead = (cfg.num_layers,) if m.stacked else ()
        if m.kind == "linear":
            out.append(Tensor(f"{m.ours}/kernel", f"{m.theirs}.weight", lead + m.shape, True, m.stacked))
            out.append(Tensor(f"{m.ours}/bias", f"{m.theirs}.bias", lead + m.shape[1:], False, m.stacked))
        else:
            leaf = "scale" if m.kind == "norm" else "embedding"
            out.append(Tensor(f"{m.ours}/{leaf}", f"{m.theirs}.weight", lead + m.shape, False, m.stacked))
    return out


def linear_modules(cfg: MMDiTConfig) -> dict[str, Module]:
    """LoRA-able modules by their PEFT-style name relative to a block ("attn.to_q") or the model ("img_in")."""
    out = {}
    for m in modules(cfg):
        if m.kind == "linear":
            out[m.theirs.removeprefix(BLOCK_PREFIX)] = m
    return out
