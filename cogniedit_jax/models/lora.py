"""LoRA as its own pytree, applied unmerged inside `transformer_forward`, and diffusers/PEFT file I/O.

`Lora.params` mirrors the parameter tree: for each adapted Linear at path P, `P/a` [in, r] and
`P/b` [r, out] (stacked on the layer axis under "blocks/"). The PEFT update is
`W x + (alpha / r) * B A x`; `Lora.scale` = alpha / r is static, so gradients and optimizer states only
ever see `a` and `b`.

The file is the one `QwenImageEditPipeline.load_lora_weights` / `transformer.load_lora_adapter` read:
`transformer.<module>.lora_A.weight` [r, in], `transformer.<module>.lora_B.weight` [out, r], and the
adapter config (r, lora_alpha, ...) as JSON under the safetensors metadata key `lora_adapter_metadata`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from cogniedit_jax.models import param_mapping
from cogniedit_jax.models.config import MMDiTConfig

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PREFIX = "transformer."
# The attention projections of every block: what Flow-GRPO-style trainers adapt on Qwen-Image.
DEFAULT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


@flax.struct.dataclass
class Lora:
    params: dict
    scale: float = flax.struct.field(pytree_node=False, default=1.0)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] = DEFAULT_TARGETS


def resolve_targets(cfg: MMDiTConfig, targets) -> dict[str, param_mapping.Module]:
    """PEFT-style target names (a module name or a dotted suffix of it) -> the Linear modules they pick."""
    mods = param_mapping.linear_modules(cfg)
    out, unmatched = {}, []
    for target in targets:
        hits = {n: m for n, m in mods.items() if n == target or n.endswith("." + target)}
        if not hits:
            unmatched.append(target)
        out.update(hits)
    if unmatched:
        raise ValueError(f"LoRA targets {unmatched} match no Linear module; known: {sorted(mods)}")
    return out


def init_lora(cfg: MMDiTConfig, lora_cfg: LoraConfig, key) -> Lora:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming init), B = 0: the model is unchanged at init. fp32."""
    mods = resolve_targets(cfg, lora_cfg.targets)
    flat = {}
    for (name, m), k in zip(sorted(mods.items()), jax.random.split(key, len(mods))):
        lead = (cfg.num_layers,) if m.stacked else ()
        d_in, d_out = m.shape
        bound = 1.0 / math.sqrt(d_in)
        flat[f"{m.ours}/a"] = jax.random.uniform(k, lead + (d_in, lora_cfg.rank), jnp.float32, -bound, bound)
        flat[f"{m.ours}/b"] = jnp.zeros(lead + (lora_cfg.rank, d_out), jnp.float32)
    return Lora(traverse_util.unflatten_dict(flat, sep="/"), lora_cfg.alpha / lora_cfg.rank)


def _lora_file(path: Path) -> Path:
    path = Path(path)
    file = path / WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA file at {file}")
    return file


def _read_metadata(file: Path) -> dict:
    with safe_open(file, "numpy") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if not raw:
        return {}
    meta = json.loads(raw)
    # A pipeline's save_lora_weights prefixes every field with the component name.
    if any(k.startswith(PREFIX) for k in meta):
        meta = {k.removeprefix(PREFIX): v for k, v in meta.items() if k.startswith(PREFIX)}
    return meta


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank/alpha_pattern: a key matches a module name exactly, as a dotted suffix, or as a regex."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


_KEY = re.compile(r"^(?:transformer\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_LAYER = re.compile(r"^transformer_blocks\.(?P<i>\d+)\.(?P<rest>.+)$")


def load_diffusers_lora(path, cfg: MMDiTConfig) -> Lora:
    """Read a diffusers/PEFT LoRA file (or a folder holding `pytorch_lora_weights.safetensors`).

    alpha comes from the adapter metadata (rank/alpha patterns honoured), else from per-module `.alpha`
    tensors, else alpha = r (diffusers' rule for files without it). Modules whose scale differs from the
    most common one get that ratio folded into B, so one static scale serves the whole pytree.
    Keys that are not LoRA A/B of a known Linear, or shapes that do not fit, fail with one error listing each.
    """
    file = _lora_file(path)
    meta = _read_metadata(file)
    mods = param_mapping.linear_modules(cfg)
    weights, alphas, problems = {}, {}, []
    with safe_open(file, "numpy") as f:
        for key in f.keys():
            if key.endswith(".alpha"):
                alphas[key.removeprefix(PREFIX).removesuffix(".alpha")] = float(f.get_tensor(key))
                continue
            match = _KEY.match(key)
            if not match:
                problems.append(f"unexpected key {key}")
                continue
            module = match["module"]
            layer = _LAYER.match(module)
            name, index = (layer["rest"], int(layer["i"])) if layer else (module, None)
            m = mods.get(name)
            if m is None or m.stacked != (index is not None) or (index is not None and index >= cfg.num_layers):
                problems.append(f"{key}: no such Linear module in this model")
                continue
            weights[(module, match["ab"])] = (m, index, f.get_tensor(key).astype(np.float32))
    # Per-module ranks and scales.
    flat, scales = {}, {}
    for (module, ab), (m, index, w) in sorted(weights.items(), key=lambda kv: kv[0]):
        if ab != "A":
            continue
        if (module, "B") not in weights:
            problems.append(f"{module}: lora_A without lora_B")
            continue
        b = weights[(module, "B")][2]
        rank = w.shape[0]
        d_in, d_out = m.shape
        if w.shape != (rank, d_in) or b.shape != (d_out, rank):
            problems.append(f"{module}: lora_A {w.shape} / lora_B {b.shape}, expected ({rank}, {d_in}) / "
                            f"({d_out}, {rank})")
            continue
        default_alpha = alphas.get(module, meta.get("lora_alpha", rank) if meta else rank)
        r = _pattern_value(meta.get("rank_pattern", {}), module, meta.get("r", rank)) if meta else rank
        if r != rank:
            problems.append(f"{module}: the file's rank {rank} differs from its metadata rank {r}")
            continue
        alpha = _pattern_value(meta.get("alpha_pattern", {}), module, default_alpha) if meta else default_alpha
        scales[module] = alpha / rank
        flat.setdefault(m.ours, {})[index] = (w.T, b.T, module)
    problems += [f"{module}: lora_B without lora_A" for module, ab in weights
                 if ab == "B" and (module, "A") not in weights]
    if problems:
        raise ValueError(f"{file}: cannot load this LoRA:\n  " + "\n  ".join(problems))
    if not flat:
        raise ValueError(f"{file}: holds no LoRA weights")
    scale = max(set(scales.values()), key=list(scales.values()).count)
    tree = {}
    for ours, per_layer in flat.items():
        ranks = {a.shape[1] for a, _, _ in per_layer.values()}
        if len(ranks) > 1:
            raise ValueError(f"{file}: module {ours} has different ranks across layers {sorted(ranks)}")
        rank = ranks.pop()

        def folded(a, b, module):
            return a, b * (scales[module] / scale)

        if None in per_layer:
            tree[f"{ours}/a"], tree[f"{ours}/b"] = folded(*per_layer[None])
            continue
        d_in, d_out = next(iter(per_layer.values()))[0].shape[0], next(iter(per_layer.values()))[1].shape[1]
        # Layers the file leaves out carry a zero update.
        a = np.zeros((cfg.num_layers, d_in, rank), np.float32)
        b = np.zeros((cfg.num_layers, rank, d_out), np.float32)
        for i, entry in per_layer.items():
            a[i], b[i] = folded(*entry)
        tree[f"{ours}/a"], tree[f"{ours}/b"] = a, b
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in tree.items()}, sep="/")
    return Lora(params, float(scale))


def save_diffusers_lora(lora: Lora, cfg: MMDiTConfig, out_dir) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` as diffusers' pipeline `save_lora_weights` does."""
    by_path = {m.ours: name for name, m in param_mapping.linear_modules(cfg).items()}
    flat = traverse_util.flatten_dict(jax.device_get(lora.params), sep="/")
    tensors, targets, rank = {}, [], None
    for path in sorted({k.rsplit("/", 1)[0] for k in flat}):
        if path not in by_path:
            raise ValueError(f"LoRA pytree has {path!r}, which is no Linear module of this model")
        a, b = np.asarray(flat[f"{path}/a"], np.float32), np.asarray(flat[f"{path}/b"], np.float32)
        rank = a.shape[-1]
        name = by_path[path]
        targets.append(name)
        layers = range(cfg.num_layers) if path.startswith(param_mapping.BLOCKS + "/") else [None]
        for i in layers:
            module = name if i is None else param_mapping.BLOCK_PREFIX.format(i=i) + name
            ai, bi = (a, b) if i is None else (a[i], b[i])
            tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(ai.T)
            tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(bi.T)
    # Every module has the same rank in our pytree (one LoraConfig); alpha = scale * r reproduces the scale.
    meta = {"r": rank, "lora_alpha": lora.scale * rank, "target_modules": sorted(targets),
            "rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0, "use_dora": False, "lora_bias": False}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    file = out / WEIGHT_NAME
    save_file(tensors, file, metadata={"format": "pt", METADATA_KEY: json.dumps(
        {PREFIX + k: v for k, v in meta.items()}, sort_keys=True)})
    return file
