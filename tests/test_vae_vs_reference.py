"""Our VAE against diffusers' `AutoencoderKLQwenImage` on tiny random models, through the user's path
(save_pretrained, sharded -> convert CLI -> load_vae); tiling, bf16, the converter's refusals, and the
real model's parameter table checked against diffusers' real architecture without its weights."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cogniedit_jax.bench.vae import random_diffusers_vae
from cogniedit_jax.models import VAEConfig, load_vae, vae_decode, vae_encode
from cogniedit_jax.models.loading import PARAMS_NAME
from cogniedit_jax.models.vae import _tiled, denormalize_latents, normalize_latents, vae_encode_sample
from cogniedit_jax.models.vae_mapping import convert_vae, param_tensors, tensors

REPO = Path(__file__).resolve().parents[1]
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
            latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[1.5, 0.7, 2.0, 1.1])
# Not square, not powers of two (multiples of 8, as the pipeline makes them).
IMAGE_SIZES = [(40, 56), (72, 24)]
# Tiles of 32 pixels every 24: on 72 x 56 images, 3 x 3 tiles of 4 different shapes (edges smaller).
TILING = dict(use_tiling=True, tile_sample_min_height=32, tile_sample_min_width=32,
              tile_sample_stride_height=24, tile_sample_stride_width=24)


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "convert/qwen_image_edit.py", "--no-progress", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def model():
    return random_diffusers_vae(seed=3, **TINY)


@pytest.fixture(scope="module")
def converted(model, tmp_path_factory):
    """The model saved in several shards + index, converted by the CLI to fp32."""
    src, out = tmp_path_factory.mktemp("diffusers"), tmp_path_factory.mktemp("converted")
    model.save_pretrained(src, max_shard_size="20KB")
    assert len(list(src.glob("*.safetensors"))) >= 3
    result = run_cli("--vae", src, "--out", out)
    assert result.returncode == 0, result.stderr
    assert not (out / "transformer").exists()
    return out


def images(size, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *size, generator=g) * 2 - 1


def latents(size, batch=2, seed=0):
    return torch.randn(batch, 4, *size, generator=torch.Generator().manual_seed(seed))


def diffusers_encode(model, x):
    """-> (mean, std) of diffusers' posterior, frame axis dropped."""
    with torch.no_grad():
        dist = model.encode(x[:, :, None]).latent_dist
    return dist.mean[:, :, 0].float().numpy(), dist.std[:, :, 0].float().numpy()


def diffusers_decode(model, z):
    with torch.no_grad():
        return model.decode(z[:, :, None]).sample[:, :, 0].clamp(-1, 1).float().numpy()


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_encode_and_decode_match_diffusers(model, converted, size):
    cfg, params = load_vae(converted)
    assert cfg.dtype == "float32" and cfg.z_dim == 4
    x = images(size)
    mean = vae_encode(cfg, params, jnp.asarray(x.numpy()))
    assert mean.shape == (2, 4, size[0] // 8, size[1] // 8)
    assert relative_error(mean, diffusers_encode(model, x)[0]) <= 1e-4

    z = latents((size[0] // 8, size[1] // 8))
    ref = diffusers_decode(model, z)
    assert np.mean(np.abs(ref) == 1) < 0.05  # a test of the network, not of the clamp
    decoded = vae_decode(cfg, params, jnp.asarray(z.numpy()))
    assert decoded.shape == (2, 3, *size)
    assert relative_error(decoded, ref) <= 1e-4


def test_attention_query_chunks_change_nothing(converted):
    """The decoder's mid-block runs on 9 x 7 = 63 latent positions: 4 chunks of 16 queries, the last one
    padded. Equal up to fp32 summation order (other matmul shapes), which the decoder amplifies to ~3e-6."""
    cfg, params = load_vae(converted)
    z = jnp.asarray(latents((9, 7)).numpy())
    chunked = vae_decode(cfg.replace(attention_query_chunk=16), params, z)
    assert relative_error(chunked, vae_decode(cfg, params, z)) <= 1e-5


def test_sample_is_mean_plus_std_times_key_noise(model, converted):
    cfg, params = load_vae(converted)
    x = images(IMAGE_SIZES[0])
    mean, std = diffusers_encode(model, x)
    key = jax.random.key(7)
    sample = vae_encode_sample(cfg, params, jnp.asarray(x.numpy()), key)
    expected = mean + std * np.asarray(jax.random.normal(key, mean.shape))
    assert relative_error(sample, expected) <= 1e-4
    other = vae_encode_sample(cfg, params, jnp.asarray(x.numpy()), jax.random.key(8))
    assert relative_error(other, expected) > 1e-2


def test_tiled_matches_diffusers_tiled(model, converted):
    cfg, params = load_vae(converted, **TILING)
    x, z = images((72, 56)), latents((9, 7))
    tiled = copy.deepcopy(model)
    tiled.enable_tiling(**{k: v for k, v in TILING.items() if k != "use_tiling"})
    assert relative_error(vae_encode(cfg, params, jnp.asarray(x.numpy())), diffusers_encode(tiled, x)[0]) <= 1e-4
    assert relative_error(vae_decode(cfg, params, jnp.asarray(z.numpy())), diffusers_decode(tiled, z)) <= 1e-4
    # An image no larger than one tile is not tiled.
    small = images((32, 24))
    np.testing.assert_array_equal(vae_encode(cfg, params, jnp.asarray(small.numpy())),
                                  vae_encode(cfg.replace(use_tiling=False), params, jnp.asarray(small.numpy())))


@pytest.mark.parametrize("direction", ["encode", "decode"])
def test_tiling_equals_untiled_for_local_maps(direction):
    """Where every tile computes what the whole image would (a map with no reach across 8x8 blocks), the
    overlapping tiles, the blending and the assembly give back the untiled result: what tiling the real,
    trained VAE approximates (random networks reach across the tiles, see the test above)."""
    x = jax.random.normal(jax.random.key(0), (2, 72, 56, 3) if direction == "encode" else (2, 9, 7, 3))
    if direction == "encode":  # 8x8 average pooling, like the encoder's resolution change
        fn = lambda t: t.reshape(t.shape[0], t.shape[1] // 8, 8, t.shape[2] // 8, 8, 3).mean((2, 4))  # noqa: E731
        tiled = jax.jit(lambda x: _tiled(fn, x, (32, 32), (24, 24), (4, 4), (3, 3), (9, 7)))(x)
    else:  # 8x nearest upsampling, like the decoder's
        fn = lambda t: jnp.repeat(jnp.repeat(t, 8, axis=1), 8, axis=2)  # noqa: E731
        tiled = jax.jit(lambda x: _tiled(fn, x, (4, 4), (3, 3), (32, 32), (24, 24), (72, 56)))(x)
    untiled = fn(x)
    assert tiled.shape == untiled.shape
    assert relative_error(tiled, untiled) <= 1e-6


def test_tiling_bounds_memory():
    """XLA's scratch memory for decoding a 512^2 image at the real model's widths (compiled, not run:
    abstract params): diffusers' default tiles (256 pixels every 192), run one at a time, need under a third
    of it. (Encoding shares the tiling code.)"""
    cfg = VAEConfig(num_res_blocks=1)  # half the depth: half the compile time, the same activation sizes
    params = traverse_util.unflatten_dict(
        {t.ours: jax.ShapeDtypeStruct(t.shape, jnp.float32) for t in param_tensors(cfg)}, sep="/")

    def scratch(c):
        compiled = vae_decode.lower(c, params, jax.ShapeDtypeStruct((1, 16, 64, 64), jnp.float32)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert scratch(cfg.replace(use_tiling=True)) < scratch(cfg) / 3


def test_bfloat16(model, tmp_path):
    src = tmp_path / "diffusers"
    model.save_pretrained(src)
    convert_vae(src, tmp_path / "out", dtype="bfloat16", progress=False)
    with safe_open(tmp_path / "out" / "vae" / PARAMS_NAME, "numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    cfg, params = load_vae(tmp_path / "out")
    assert cfg.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}

    x, z = images(IMAGE_SIZES[1]), latents((9, 3))
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    ref_mean, ref_dec = diffusers_encode(model, x)[0], diffusers_decode(model, z)
    mean16 = diffusers_encode(model16, x.to(torch.bfloat16))[0]
    dec16 = diffusers_decode(model16, z.to(torch.bfloat16))
    ours_mean = vae_encode(cfg, params, jnp.asarray(x.numpy()))
    ours_dec = vae_decode(cfg, params, jnp.asarray(z.numpy()))
    assert ours_mean.dtype == ours_dec.dtype == jnp.bfloat16
    # Ours drifts from fp32 no more than diffusers' own bf16 run does.
    assert relative_error(ours_mean, ref_mean) <= max(1.5 * relative_error(mean16, ref_mean), 1e-2)
    assert relative_error(ours_dec, ref_dec) <= max(1.5 * relative_error(dec16, ref_dec), 1e-2)


def test_latent_normalisation_is_the_pipelines(converted):
    cfg, _ = load_vae(converted)
    z = latents((5, 7))
    mean = torch.tensor(TINY["latents_mean"]).view(1, 4, 1, 1)
    std = torch.tensor(TINY["latents_std"]).view(1, 4, 1, 1)
    # QwenImageEditPipeline: (z - mean) / std after encoding; z / (1 / std) + mean before decoding. Up to an
    # ulp: XLA on CPU divides by a broadcast array as a multiplication by its reciprocal.
    np.testing.assert_allclose(normalize_latents(cfg, jnp.asarray(z.numpy())), ((z - mean) / std).numpy(),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(denormalize_latents(cfg, jnp.asarray(z.numpy())),
                               (z / (1.0 / std) + mean).numpy(), rtol=1e-6, atol=1e-6)
    roundtrip = denormalize_latents(cfg, normalize_latents(cfg, jnp.asarray(z.numpy())))
    np.testing.assert_allclose(roundtrip, z.numpy(), rtol=1e-5, atol=1e-5)


def test_bad_checkpoint_lists_every_problem(model, tmp_path):
    src = tmp_path / "diffusers"
    model.save_pretrained(src)
    file = src / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["decoder.up_blocks.1.upsamplers.0.time_conv.weight"]  # unused for images, but checked
    del state["encoder.down_blocks.0.conv1.bias"]
    state["encoder.extra.weight"] = torch.zeros(3)
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"][:, :, :1].contiguous()  # a 2D kernel
    save_file(state, file)
    with pytest.raises(ValueError) as err:
        convert_vae(src, tmp_path / "out", progress=False)
    for key in ("decoder.up_blocks.1.upsamplers.0.time_conv.weight", "encoder.down_blocks.0.conv1.bias",
                "encoder.extra.weight", "decoder.conv_out.weight"):
        assert key in str(err.value)
    assert not (tmp_path / "out" / "vae" / PARAMS_NAME).exists()


def test_cli_needs_something_to_convert(tmp_path):
    result = run_cli("--out", tmp_path)
    assert result.returncode != 0 and "--transformer SRC, --vae SRC" in result.stderr


def test_wrong_input_channels_are_named(converted):
    cfg, params = load_vae(converted)
    with pytest.raises(ValueError, match=r"latents must be NCHW \[B, 4, H, W\] \(z_dim=4\), got \(1, 16, 5, 7\)"):
        vae_decode(cfg, params, jnp.zeros((1, 16, 5, 7)))


def test_config_refusals(tmp_path):
    path = tmp_path / "config.json"
    VAEConfig(z_dim=4, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4).to_json(path)
    assert VAEConfig.from_json(path, dtype="bfloat16").latents_std == (1.0,) * 4
    path.write_text(path.read_text().replace('"z_dim"', '"zdim"'))
    with pytest.raises(ValueError, match=f"{path}: .*'zdim'"):
        VAEConfig.from_json(path)
    with pytest.raises(ValueError, match="attn_scales"):
        VAEConfig(attn_scales=(0.5,))
    with pytest.raises(ValueError, match="tile_sample_stride_width=300"):
        VAEConfig(tile_sample_stride_width=300)


def test_real_model_table_matches_diffusers_architecture():
    """The released VAE's config, built by diffusers on the meta device (no weights): every key and shape."""
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):
        real = AutoencoderKLQwenImage()
    theirs = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    assert {t.theirs: t.their_shape for t in tensors(VAEConfig())} == theirs
    ours = sum(int(np.prod(t.shape)) for t in param_tensors(VAEConfig()))
    assert sum(int(np.prod(s)) for s in theirs.values()) == pytest.approx(126.9e6, rel=1e-3)
    assert ours < sum(int(np.prod(s)) for s in theirs.values())  # without time_conv and the unused taps
