"""LoRA as its own pytree, applied unmerged inside `transformer_forward`, and diffusers/PEFT file I/O.

`Lora.params` mirrors the parameter tree: for each adapted Linear at path P, `P/a` [in, r] and
`P/b` [r, out] (stacked on the layer axis under "blocks/"). The PEFT update is
`W x + (alpha / r) * B A x`; `Lora.scale` = alpha / r is static, so gradients and optimizer states only
ever see `a` and `b`.

The file is the one `QwenImageEditPipeline.load_lora_weights` / `transformer.load_lora_adapter` read:
`transformer.<module>.lora_A.weight` [r, in], `transformer.<module>.lora_B.weight` [out, r], and the
PEFT `LoraConfig` (r, lora_alpha, rank_pattern, alpha_pattern, ...) as JSON under the safetensors
metadata key `lora_adapter_metadata`, each field prefixed with "transformer.".
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (lets safetensors' numpy backend read bf16: most released LoRAs are bf16)
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
# PEFT's LoraConfig defaults, which diffusers' `LoraConfig(**metadata)` falls back to for absent fields.
_PEFT_DEFAULT_R, _PEFT_DEFAULT_ALPHA = 8, 8


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
    if not out:
        raise ValueError("LoRA targets: none given")
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


def _lora_file(path) -> Path:
    path = Path(path)
    file = path / WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA file at {file}")
    return file


def _read_metadata(file: Path) -> dict:
    """The adapter's LoraConfig fields, or {} where the file has none."""
    with safe_open(file, "numpy") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    meta = json.loads(raw) if raw else {}
    # A pipeline's save_lora_weights prefixes every field with the component name; a transformer's
    # save_lora_adapter does not.
    if any(k.startswith(PREFIX) for k in meta):
        meta = {k.removeprefix(PREFIX): v for k, v in meta.items() if k.startswith(PREFIX)}
    return meta


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (`peft.utils.other.get_pattern_key`): the first key that
    matches the end of the module name, at a dot boundary, as a regex."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# "transformer." (pipeline files), "diffusion_model." (musubi-tuner / ComfyUI files) or no prefix
# (transformer.save_lora_adapter files).
_KEY = re.compile(r"^(?:transformer\.|diffusion_model\.)?(?P<module>.+)"
                  r"\.(?:lora_(?P<ab>[AB])\.weight|(?P<alpha>alpha))$")
_LAYER = re.compile(r"^transformer_blocks\.(?P<i>\d+)\.(?P<rest>.+)$")


def _locate(module: str, cfg: MMDiTConfig, mods: dict) -> tuple[param_mapping.Module, int | None] | None:
    """PEFT module name ("transformer_blocks.3.attn.to_q", "proj_out") -> (our Module, block index | None)."""
    layer = _LAYER.match(module)
    name, index = (layer["rest"], int(layer["i"])) if layer else (module, None)
    m = mods.get(name)
    if m is None or m.stacked != (index is not None) or (index is not None and index >= cfg.num_layers):
        return None
    return m, index


def _module_scale(module: str, rank: int, meta: dict, file_alpha: float | None) -> tuple[float, str | None]:
    """The module's effective LoRA scale as diffusers' pipeline loader computes it, or (nan, why not)."""
    # lora_state_dict folds a `<module>.alpha` tensor into A and B as alpha / rank (kohya-style files) ...
    scale = 1.0 if file_alpha is None else file_alpha / rank
    if not meta:
        # ... and without metadata, load_lora_adapter infers alpha = r for every module: scale 1.
        return scale, None
    # ... with metadata, PEFT builds LoraConfig(**metadata): alpha / r per module, patterns first.
    r = _pattern_value(meta.get("rank_pattern"), module, meta.get("r", _PEFT_DEFAULT_R))
    if r != rank:
        return math.nan, f"rank {rank} in the weights, {r} in the adapter metadata"
    alpha = _pattern_value(meta.get("alpha_pattern"), module, meta.get("lora_alpha", _PEFT_DEFAULT_ALPHA))
    return scale * alpha / (math.sqrt(r) if meta.get("use_rslora") else r), None


def load_diffusers_lora(path, cfg: MMDiTConfig) -> Lora:
    """Read a diffusers/PEFT LoRA file (or a folder holding `pytorch_lora_weights.safetensors`) as
    `QwenImageEditPipeline.load_lora_weights` would apply it.

    Keys may carry the "transformer." prefix (pipeline files), "diffusion_model." (musubi-tuner / ComfyUI)
    or none (`save_lora_adapter` files); kohya `lora_down`/`lora_up`/`lora_unet_` names are refused.
    Every module's scale is computed as diffusers does (`_module_scale`); our pytree has one static
    scale, so modules whose scale differs from the most common one get the ratio folded into B.
    Ranks may differ per block of a stacked module: the smaller ones are zero-padded (the same B A);
    blocks the file leaves out get a = b = 0. One ValueError lists every key that does not fit.
    """
    file = _lora_file(path)
    meta = _read_metadata(file)
    mods = param_mapping.linear_modules(cfg)
    problems = [f"adapter metadata {flag}=true is not supported" for flag in ("use_dora", "lora_bias")
                if meta.get(flag)]
    weights, alphas = collections.defaultdict(dict), {}  # module -> {"A"/"B": (key, array)}; module -> alpha
    with safe_open(file, "numpy") as f:
        for key in f.keys():
            match = _KEY.match(key)
            if not match or _locate(match["module"], cfg, mods) is None:
                problems.append(f"{key}: not a lora_A / lora_B / alpha of a Linear module of this model")
            elif match["alpha"]:
                alphas[match["module"]] = float(f.get_tensor(key))
            else:
                weights[match["module"]][match["ab"]] = (key, f.get_tensor(key).astype(np.float32))

    loaded = {}  # module -> (Module, block index, a [in, r], b [r, out], scale)
    problems += [f"{module}.alpha: no lora_A / lora_B for it"
                 for module in sorted(set(alphas) - set(weights))]
    for module, pair in sorted(weights.items()):
        if len(pair) != 2:
            key = next(iter(pair.values()))[0]
            problems.append(f"{key}: its lora_{'B' if 'A' in pair else 'A'} is missing")
            continue
        (key_a, lora_a), (key_b, lora_b) = pair["A"], pair["B"]
        m, index = _locate(module, cfg, mods)
        d_in, d_out = m.shape
        rank = lora_a.shape[0] if lora_a.ndim else 0  # lora_A [r, in] defines the rank
        expected = {key_a: (rank, d_in), key_b: (d_out, rank)}
        bad = [f"{key} has shape {w.shape}, expected {expected[key]}"
               for key, w in ((key_a, lora_a), (key_b, lora_b)) if w.shape != expected[key]]
        scale, why = _module_scale(module, rank, meta, alphas.get(module))
        if why:
            bad.append(f"{key_a}: {why}")
        problems += bad
        if not bad:
            loaded[module] = (m, index, lora_a.T, lora_b.T, scale)
    if problems:
        raise ValueError(f"{file}: cannot load this LoRA ({len(problems)} problem(s)):\n  "
                         + "\n  ".join(problems))
    if not loaded:
        raise ValueError(f"{file}: holds no LoRA weights")

    scale = collections.Counter(s for *_, s in loaded.values()).most_common(1)[0][0]
    by_module = collections.defaultdict(dict)  # our Module -> {block index or None: (a, b)}
    for m, index, a, b, s in loaded.values():
        by_module[m][index] = (a, b * np.float32(s / scale))
    flat = {}
    for m, blocks in by_module.items():
        rank = max(a.shape[1] for a, _ in blocks.values())
        lead = (cfg.num_layers,) if m.stacked else ()
        flat[f"{m.ours}/a"] = np.zeros(lead + (m.shape[0], rank), np.float32)
        flat[f"{m.ours}/b"] = np.zeros(lead + (rank, m.shape[1]), np.float32)
        for index, (a, b) in blocks.items():
            at = () if index is None else (index,)
            flat[f"{m.ours}/a"][at + (slice(None), slice(0, a.shape[1]))] = a
            flat[f"{m.ours}/b"][at + (slice(0, b.shape[0]),)] = b
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
    return Lora(params, float(scale))


def save_diffusers_lora(lora: Lora, cfg: MMDiTConfig, out_dir) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` as diffusers' pipeline `save_lora_weights` does.

    Ranks may differ between modules (a loaded file's rank_pattern): the most common one is `r`, the
    others go to rank_pattern, and alpha_pattern gives them alpha = scale * rank so every module keeps
    our one scale.
    """
    mods = {m.ours: (name, m) for name, m in param_mapping.linear_modules(cfg).items()}
    flat = traverse_util.flatten_dict(jax.device_get(lora.params), sep="/")
    tensors, ranks, problems = {}, {}, []
    for path in sorted({k.rsplit("/", 1)[0] for k in flat}):
        if path not in mods or {f"{path}/a", f"{path}/b"} - set(flat):
            problems.append(f"{path}: not an a/b pair of a Linear module of this model")
            continue
        name, m = mods[path]
        a, b = np.asarray(flat[f"{path}/a"], np.float32), np.asarray(flat[f"{path}/b"], np.float32)
        lead = (cfg.num_layers,) if m.stacked else ()
        rank = a.shape[-1]
        if a.shape != lead + (m.shape[0], rank) or b.shape != lead + (rank, m.shape[1]):
            problems.append(f"{path}: a {a.shape} / b {b.shape}, expected {lead + (m.shape[0], rank)} / "
                            f"{lead + (rank, m.shape[1])}")
            continue
        ranks[name] = rank
        for index in (range(cfg.num_layers) if m.stacked else [None]):
            module = name if index is None else param_mapping.BLOCK_PREFIX.format(i=index) + name
            at = () if index is None else (index,)
            tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a[at].T)
            tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b[at].T)
    if problems or not ranks:
        raise ValueError("save_diffusers_lora: the LoRA pytree does not fit this model:\n  "
                         + "\n  ".join(problems or ["it adapts no module"]))
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {name: k for name, k in ranks.items() if k != r}
    # Pattern keys are our PEFT-relative names ("attn.to_q", "proj_out"): each is the dotted suffix of
    # exactly one module family in this model, so PEFT's suffix match picks what we mean.
    alpha_pattern = {name: lora.scale * k for name, k in rank_pattern.items()}
    meta = {"r": r, "lora_alpha": lora.scale * r, "target_modules": sorted(ranks),
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "lora_dropout": 0.0,
            "use_rslora": False, "use_dora": False, "lora_bias": False}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    file = out / WEIGHT_NAME
    save_file(tensors, file, metadata={"format": "pt", METADATA_KEY: json.dumps(
        {PREFIX + k: v for k, v in meta.items()}, indent=2, sort_keys=True)})
    return file
