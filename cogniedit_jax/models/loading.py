"""Load a converted transformer (written by `convert/qwen_image_edit.py`) straight into its final layout.

A converted folder holds `transformer/config.json` (an `MMDiTConfig`) and `transformer/params.safetensors`
(our leaf paths as keys, blocks stacked, kernels [in, out]). Each array is read slice by slice from the
memory-mapped file by `jax.make_array_from_callback`, so every device reads only its own shard and the
full model never sits on one device or in host memory twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import traverse_util
from safetensors import safe_open

from cogniedit_jax.models import param_mapping
from cogniedit_jax.models.config import MMDiTConfig

CONFIG_NAME = "config.json"
PARAMS_NAME = "params.safetensors"


def check_tensors(expected: Mapping[str, tuple], found: Mapping[str, tuple], where: str) -> None:
    """One error naming every missing, unexpected and mis-shaped tensor."""
    problems = [f"missing: {k} {tuple(expected[k])}" for k in sorted(set(expected) - set(found))]
    problems += [f"unexpected: {k} {tuple(found[k])}" for k in sorted(set(found) - set(expected))]
    problems += [f"shape: {k} expected {tuple(expected[k])}, found {tuple(found[k])}"
                 for k in sorted(set(expected) & set(found)) if tuple(expected[k]) != tuple(found[k])]
    if problems:
        head = f"{where}: {len(problems)} tensor problem(s)"
        raise ValueError(head + "\n  " + "\n  ".join(problems))


def transformer_folder(path) -> Path:
    path = Path(path)
    folder = path / "transformer" if (path / "transformer" / CONFIG_NAME).is_file() else path
    for name in (CONFIG_NAME, PARAMS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: is {path} a folder written by "
                                    "convert/qwen_image_edit.py --transformer?")
    return folder


def load_transformer(path, shardings=None, **runtime) -> tuple[MMDiTConfig, dict]:
    """-> (MMDiTConfig, params). `runtime` overrides run settings (dtype, remat_policy, attention_impl);
    params are cast to `cfg.dtype`. `shardings`: None (default device) or a pytree of `jax.sharding.Sharding`
    shaped like params, each array then built directly in that layout."""
    folder = transformer_folder(path)
    cfg = MMDiTConfig.from_json(folder / CONFIG_NAME, **runtime)
    dtype = cfg.compute_dtype
    plan = param_mapping.tensors(cfg)
    flat_shardings = traverse_util.flatten_dict(shardings, sep="/") if shardings is not None else {}
    flat = {}
    with safe_open(folder / PARAMS_NAME, "numpy") as f:
        check_tensors({t.ours: t.shape for t in plan},
                      {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, str(folder / PARAMS_NAME))
        for t in plan:
            view = f.get_slice(t.ours)
            if t.ours in flat_shardings:
                flat[t.ours] = jax.make_array_from_callback(
                    t.shape, flat_shardings[t.ours], lambda index, view=view: view[index].astype(dtype))
            else:
                flat[t.ours] = jnp.asarray(view[:], dtype=dtype)
    return cfg, traverse_util.unflatten_dict(flat, sep="/")
