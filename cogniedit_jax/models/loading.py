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
    file = folder / PARAMS_NAME
    cfg = MMDiTConfig.from_json(folder / CONFIG_NAME, **runtime)
    plan = param_mapping.tensors(cfg)
    with safe_open(file, "numpy") as f:
        check_tensors({t.ours: t.shape for t in plan},
                      {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, str(file))
    flat_shardings = _flat_shardings(shardings, plan)
    flat = {t.ours: _load_tensor(file, t, cfg.compute_dtype, flat_shardings.get(t.ours)) for t in plan}
    return cfg, traverse_util.unflatten_dict(flat, sep="/")


def _flat_shardings(shardings, plan) -> dict:
    """The shardings by leaf path; a tree that does not match params leaf for leaf is refused by name."""
    if shardings is None:
        return {}
    flat = traverse_util.flatten_dict(shardings, sep="/")
    ours = {t.ours for t in plan}
    missing, unexpected = sorted(ours - set(flat)), sorted(set(flat) - ours)
    if missing or unexpected:
        raise ValueError(f"shardings must have one Sharding per parameter: missing {missing}, "
                         f"unexpected {unexpected}")
    return flat


def _load_tensor(file: Path, t: param_mapping.Tensor, dtype, sharding):
    # A fresh mapping per tensor: while the file stays open every page read from it stays resident
    # (RssFile), so loading would peak at the whole file on top of the arrays built from it.
    with safe_open(file, "numpy") as f:
        view = f.get_slice(t.ours)
        if sharding is None:
            return jnp.asarray(view[:], dtype=dtype)
        # Each device's callback reads only its own slice of the file.
        return jax.make_array_from_callback(t.shape, sharding, lambda index: view[index].astype(dtype))
