"""diffusers checkpoint -> converter (CLI) -> load_transformer -> forward, the converter's refusals, and the
real model's parameter table checked against diffusers' real model without its 20B weights."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cogniedit_jax.models import (MMDiTConfig, init_params, load_transformer, param_mapping,
                                  transformer_forward)
from cogniedit_jax.models.conversion import SafetensorsStreamWriter, convert_transformer
from cogniedit_jax.models.loading import PARAMS_NAME, check_tensors
from tests.reference import tiny_transformer, to_jax_inputs, transformer_inputs

REPO = Path(__file__).resolve().parents[1]
# Target and condition image of different sizes; two rows whose text has different valid lengths.
IMG_SHAPES = [(1, 4, 6), (1, 3, 5)]
VALID_LENGTHS = [7, 4]
TXT_LEN = 9


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def run_cli(*args) -> None:
    """The converter as users run it: the script, from the repo root, in a fresh interpreter."""
    result = subprocess.run([sys.executable, "convert/qwen_image_edit.py", "--no-progress", *map(str, args)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(seed=1)


@pytest.fixture(scope="module")
def inputs(model):
    return transformer_inputs(model, IMG_SHAPES, VALID_LENGTHS, TXT_LEN)


@pytest.fixture(scope="module")
def reference(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].numpy()


@pytest.fixture(scope="module")
def sharded(model, tmp_path_factory):
    """The tiny model saved as several shards + index, as the real checkpoint is."""
    path = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.fixture(scope="module")
def converted_fp32(sharded, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted_fp32")
    run_cli("--transformer", sharded, "--out", out)
    return out


@pytest.fixture
def single_file(model, tmp_path):
    path = tmp_path / "diffusers"
    model.save_pretrained(path)
    return path


def forward(cfg, params, inputs):
    return transformer_forward(cfg, params, **to_jax_inputs(inputs))


def test_sharded_checkpoint_through_cli_matches_diffusers(sharded, converted_fp32, inputs, reference):
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    cfg, params = load_transformer(converted_fp32)
    assert cfg.dtype == "float32" and cfg.num_layers == 2
    assert relative_error(forward(cfg, params, inputs), reference) <= 1e-4


def test_bfloat16_conversion(model, sharded, converted_fp32, tmp_path, inputs, reference):
    run_cli("--transformer", sharded, "--out", tmp_path, "--dtype", "bfloat16")
    with safe_open(tmp_path / "transformer" / PARAMS_NAME, "numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    cfg, params = load_transformer(tmp_path)
    assert cfg.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    # The cast is round-to-nearest of the fp32 weights, nothing else.
    _, params32 = load_transformer(converted_fp32)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)), params, params32)
    # bf16 rounds the timestep, its sinusoid frequencies and every activation, which this random model
    # amplifies: diffusers' own bf16 run is 0.1-0.2 (max-relative) off its fp32 output. Ours must be as good.
    ours_error = relative_error(forward(cfg, params, inputs), reference)
    assert ours_error <= 1.5 * relative_error(diffusers_bfloat16(model, inputs), reference)
    assert ours_error < 0.25


def diffusers_bfloat16(model, inputs):
    model = copy.deepcopy(model).to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in inputs.items()}
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].float().numpy()


def test_bad_checkpoint_lists_every_problem(single_file, tmp_path):
    file = single_file / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["transformer_blocks.1.attn.to_k.weight"]
    state["transformer_blocks.0.attn.extra.weight"] = torch.zeros(3)
    state["img_in.weight"] = state["img_in.weight"][:, :-1].contiguous()
    save_file(state, file)
    with pytest.raises(ValueError) as err:
        convert_transformer(single_file, tmp_path / "out", progress=False)
    for key in ("transformer_blocks.1.attn.to_k.weight", "transformer_blocks.0.attn.extra.weight",
                "img_in.weight"):
        assert key in str(err.value)
    assert not (tmp_path / "out" / "transformer" / PARAMS_NAME).exists()


def test_missing_config_names_the_path(single_file, tmp_path):
    (single_file / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(single_file / "config.json")):
        convert_transformer(single_file, tmp_path / "out", progress=False)


def test_index_naming_a_missing_shard(model, tmp_path):
    src = tmp_path / "diffusers"
    model.save_pretrained(src, max_shard_size="100KB")
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        convert_transformer(src, tmp_path / "out", progress=False)


def test_index_disagreeing_with_shards(model, tmp_path):
    src = tmp_path / "diffusers"
    model.save_pretrained(src, max_shard_size="100KB")
    index_file = src / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = "img_in.weight"
    index["weight_map"][key] = next(s for s in shards if s != index["weight_map"][key])
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=key):
        convert_transformer(src, tmp_path / "out", progress=False)


def test_refuses_a_dtype_the_model_cannot_run_in(single_file, tmp_path):
    with pytest.raises(ValueError, match="float16"):
        convert_transformer(single_file, tmp_path / "out", dtype="float16", progress=False)
    assert not (tmp_path / "out" / "transformer" / PARAMS_NAME).exists()


def test_real_model_table_and_shapes():
    """The real Qwen-Image-Edit transformer (diffusers' class defaults), built without allocating weights."""
    import accelerate
    from diffusers import QwenImageTransformer2DModel

    with accelerate.init_empty_weights():
        model = QwenImageTransformer2DModel()
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(state) == 1933
    assert sum(int(np.prod(s)) for s in state.values()) == 20_430_401_088

    cfg = MMDiTConfig.from_diffusers(dict(model.config))
    plan = param_mapping.tensors(cfg)
    their_keys = [k for t in plan for k in t.their_keys(cfg.num_layers)]
    assert len(their_keys) == len(set(their_keys)) == len(state)
    expected = {k: t.their_shape() for t in plan for k in t.their_keys(cfg.num_layers)}
    check_tensors(expected, state, "real model")

    abstract = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    flat = traverse_util.flatten_dict(abstract, sep="/")
    assert {k: v.shape for k, v in flat.items()} == {t.ours: t.shape for t in plan}

    # One row: a 16x16-latent target and condition (8x8 tokens each), 16 text tokens.
    x = jax.ShapeDtypeStruct((1, 128, cfg.in_channels), jnp.float32)
    txt = jax.ShapeDtypeStruct((1, 16, cfg.joint_attention_dim), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    out = jax.eval_shape(functools.partial(transformer_forward, cfg, img_shapes=[[(1, 8, 8), (1, 8, 8)]]),
                         abstract, x, txt, mask, t)
    assert out.shape == (1, 128, 64) and out.dtype == jnp.float32


def test_load_with_shardings_matches_plain_load(converted_fp32):
    _, plain = load_transformer(converted_fp32)
    mesh = jax.make_mesh((1,), ("layers",))
    device = jax.devices()[0]

    def sharding(path, leaf):
        # Stacked block parameters split over the layer axis, the rest on one device: both kinds.
        if path[0].key == "blocks":
            return NamedSharding(mesh, PartitionSpec("layers"))
        return SingleDeviceSharding(device)

    shardings = jax.tree_util.tree_map_with_path(sharding, plain)
    _, sharded = load_transformer(converted_fp32, shardings=shardings)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), sharded, plain)
    for array, wanted in zip(jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
        assert array.sharding.is_equivalent_to(wanted, array.ndim), (array.sharding, wanted)


def test_load_with_shardings_refuses_a_partial_tree(converted_fp32):
    _, plain = load_transformer(converted_fp32)
    shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), plain)
    del shardings["img_in"]
    with pytest.raises(ValueError, match="img_in/kernel"):
        load_transformer(converted_fp32, shardings=shardings)


_MULTI_DEVICE_LOAD = """
import sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from cogniedit_jax.models import load_transformer

assert jax.device_count() == 4, jax.devices()
_, plain = load_transformer(sys.argv[1])
mesh = jax.make_mesh((2, 2), ("a", "b"))

def spec(x):
    # Split the first and last axes where they divide, so every device reads a real 2-D slice.
    axes = [None] * x.ndim
    if x.shape[0] % 2 == 0:
        axes[0] = "a"
    if x.ndim > 1 and x.shape[-1] % 2 == 0:
        axes[-1] = "b"
    return NamedSharding(mesh, PartitionSpec(*axes))

shardings = jax.tree.map(spec, plain)
_, sharded = load_transformer(sys.argv[1], shardings=shardings)
split = 0
for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    split += a.sharding.shard_shape(a.shape) != a.shape
assert split > 20, split
"""


def test_load_across_four_devices_matches_plain_load(converted_fp32):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _MULTI_DEVICE_LOAD, str(converted_fp32)],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_stream_writer_tracks_unwritten_layers(tmp_path):
    layout = {"stacked": ((3, 2, 4), np.dtype(np.float32)), "single": ((5,), np.dtype(ml_dtypes.bfloat16))}
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", layout)
    layers = np.arange(24, dtype=np.float32).reshape(3, 2, 4)
    writer.write("stacked", layers[2], layer=2)
    writer.write("stacked", layers[0], layer=0)
    assert writer.unwritten() == ["stacked[1]", "single"]
    single = np.linspace(-1, 1, 5).astype(ml_dtypes.bfloat16)
    writer.write("single", single)
    writer.write("stacked", layers[1], layer=1)
    writer.close()
    assert writer.unwritten() == []
    with safe_open(tmp_path / "x.safetensors", "numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("stacked"), layers)
        np.testing.assert_array_equal(f.get_tensor("single"), single)


def test_convert_refuses_to_finish_with_an_unwritten_layer(single_file, tmp_path, monkeypatch):
    write = SafetensorsStreamWriter.write

    def drop_one_layer(self, name, array, layer=None):
        if (name, layer) != ("blocks/img_mod/kernel", 1):
            write(self, name, array, layer)

    monkeypatch.setattr(SafetensorsStreamWriter, "write", drop_one_layer)
    with pytest.raises(RuntimeError, match=r"blocks/img_mod/kernel\[1\]"):
        convert_transformer(single_file, tmp_path / "out", progress=False)
    assert list((tmp_path / "out" / "transformer").iterdir()) == []
