"""LoRA parity with diffusers + PEFT (CPU, fp32): PEFT adapters saved the diffusers way load into ours with
the same output, ours load back into diffusers with the same output, and alpha / rank patterns, alpha-less
and `.alpha`-keyed files mean what diffusers makes of them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.torch
import torch
from diffusers import QwenImageEditPipeline
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from cogniedit_jax.models import load_transformer, transformer_forward
from cogniedit_jax.models.conversion import convert_transformer
from cogniedit_jax.models.lora import (DEFAULT_TARGETS, METADATA_KEY, WEIGHT_NAME, Lora, LoraConfig,
                                       init_lora, load_diffusers_lora, save_diffusers_lora)
from tests.reference import tiny_transformer, transformer_inputs

TOL = 1e-4  # relative max error, fp32
SEED = 7  # base weights: every tiny_transformer(SEED) is the same model
# Attention projections of both streams, an MLP, and top-level modules outside the blocks.
PEFT_TARGETS = [*DEFAULT_TARGETS, "img_mlp.net.2", "proj_out", "time_text_embed.timestep_embedder.linear_1"]


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max() / np.abs(ref).max()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(cfg, params) of tiny_transformer(SEED) through the user's path, the inputs (batch 2, text padded to
    different lengths, a target and a condition image of different shapes), our forward on them."""
    tmp = tmp_path_factory.mktemp("base")
    model = tiny_transformer(SEED)
    model.save_pretrained(tmp / "diffusers")
    convert_transformer(tmp / "diffusers", tmp / "converted", progress=False)
    cfg, params = load_transformer(tmp / "converted")
    inputs = transformer_inputs(model, [(1, 4, 6), (1, 3, 5)], [7, 4], 9, seed=1)
    arrays = {k: jnp.asarray(v.numpy()) for k, v in inputs.items() if torch.is_tensor(v)}
    # Jitted once for the module (a compile per LoRA tree structure): several times faster than eager.
    forward = jax.jit(lambda lora: transformer_forward(cfg, params, **arrays, img_shapes=inputs["img_shapes"],
                                                       lora=lora))
    return cfg, params, inputs, forward


def torch_out(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].numpy()


def ours_out(base, lora):
    """Our output with `lora` (a Lora or None); jax.grad goes through it."""
    return base[3](lora)


def peft_model(seed, **lora_kwargs):
    """tiny_transformer(SEED) with a PEFT adapter whose A and B are random and non-zero; its LoraConfig."""
    model = tiny_transformer(SEED)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": PEFT_TARGETS, **lora_kwargs})
    model.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # A [r, in], B [out, r]: an update about as large as W x
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
    return model, config


def diffusers_loads(folder, via="pipeline"):
    """A fresh tiny_transformer(SEED) with `folder/pytorch_lora_weights.safetensors` loaded as diffusers does:
    the pipeline's `load_lora_weights` path (its two classmethods, no pipeline needed) or
    `transformer.load_lora_adapter`. The latter needs weight_name (or use_safetensors=True): without it,
    a folder is searched for the .bin name, and a file's path loads the weights but drops the adapter
    metadata, so alpha silently becomes r."""
    model = tiny_transformer(SEED)
    if via == "pipeline":
        state_dict, metadata = QwenImageEditPipeline.lora_state_dict(str(folder), return_lora_metadata=True)
        QwenImageEditPipeline.load_lora_into_transformer(state_dict, transformer=model, metadata=metadata)
    else:
        model.load_lora_adapter(str(folder), weight_name=WEIGHT_NAME, prefix="transformer")
    return model


def read_file(path):
    with safe_open(path, "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


PATTERNS = dict(
    # A regex key picking one block's to_k (its scale differs from the other block's), a suffix key;
    # one top-level module and one block's module with another rank.
    alpha_pattern={r"transformer_blocks\.1\.attn\.to_k": 3, "img_mlp.net.2": 5},
    rank_pattern={"proj_out": 2, "transformer_blocks.0.attn.add_q_proj": 2},
)


@pytest.mark.parametrize("patterns", [False, True], ids=["plain", "rank_alpha_patterns"])
def test_peft_adapter_loads_into_ours(base, tmp_path, patterns):
    model, config = peft_model(seed=1, **(PATTERNS if patterns else {}))
    QwenImageEditPipeline.save_lora_weights(tmp_path / "pipe",
                                            transformer_lora_layers=peft.get_peft_model_state_dict(model),
                                            transformer_lora_adapter_metadata=config.to_dict())
    ref = torch_out(model, base[2])
    lora = load_diffusers_lora(tmp_path / "pipe", base[0])
    assert lora.scale == 2.0  # alpha 8 / r 4 (alpha != r on purpose)
    ours = ours_out(base, lora)
    assert rel_err(ours, ref) <= TOL
    assert rel_err(ours_out(base, None), ref) > 0.1  # the adapter matters: the comparison is not vacuous
    # diffusers reading that file agrees with the model that wrote it.
    for via in ("pipeline", "load_lora_adapter"):
        assert rel_err(torch_out(diffusers_loads(tmp_path / "pipe", via), base[2]), ref) <= TOL, via
    # transformer.save_lora_adapter writes the same file without the "transformer." prefixes.
    model.save_lora_adapter(tmp_path / "bare")
    assert not any(k.startswith("transformer.") for k in read_file(tmp_path / "bare" / WEIGHT_NAME)[0])
    assert rel_err(ours_out(base, load_diffusers_lora(tmp_path / "bare", base[0])), ref) <= TOL


def random_lora(cfg):
    """Ranks differ between modules (4 and 2), scale 1.5, a and b random and non-zero."""
    big = init_lora(cfg, LoraConfig(rank=4, alpha=6.0, targets=DEFAULT_TARGETS + ("txt_mlp.net.0.proj",)),
                    jax.random.key(0))
    small = init_lora(cfg, LoraConfig(rank=2, alpha=3.0, targets=("proj_out", "img_in")), jax.random.key(1))
    flat = {**traverse_util.flatten_dict(big.params), **traverse_util.flatten_dict(small.params)}
    keys = jax.random.split(jax.random.key(2), len(flat))
    flat = {path: jax.random.normal(k, leaf.shape) / np.sqrt(leaf.shape[-2])
            for (path, leaf), k in zip(sorted(flat.items()), keys)}
    return Lora(traverse_util.unflatten_dict(flat), scale=1.5)


def test_ours_exported_loads_into_diffusers(base, tmp_path):
    cfg = base[0]
    lora = random_lora(cfg)
    file = save_diffusers_lora(lora, cfg, tmp_path)
    tensors, metadata = read_file(file)
    assert tensors["transformer.transformer_blocks.1.attn.to_q.lora_A.weight"].shape == (4, cfg.inner_dim)
    assert tensors["transformer.proj_out.lora_B.weight"].shape == (cfg.out_features, 2)
    meta = json.loads(metadata[METADATA_KEY])
    assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (4, 6.0)
    assert meta["transformer.rank_pattern"] == {"img_in": 2, "proj_out": 2}
    assert meta["transformer.alpha_pattern"] == {"img_in": 3.0, "proj_out": 3.0}

    ours = ours_out(base, lora)
    assert rel_err(ours_out(base, None), ours) > 0.1
    for via in ("pipeline", "load_lora_adapter"):
        assert rel_err(torch_out(diffusers_loads(tmp_path, via), base[2]), ours) <= TOL, via
    # And back: the same pytree, bit for bit.
    back = load_diffusers_lora(file, cfg)
    assert back.scale == lora.scale
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), back.params, lora.params))


def test_file_without_metadata_means_alpha_equals_rank(base, tmp_path):
    """No metadata: diffusers infers alpha = r for each module (ranks differ here), so scale 1 everywhere,
    whatever alpha the writer trained with. Stored in bf16, as most released LoRAs are."""
    model, _ = peft_model(seed=2, rank_pattern={"proj_out": 2})
    state_dict = peft.get_peft_model_state_dict(model)
    tensors = {f"transformer.{k}": v.to(torch.bfloat16) for k, v in state_dict.items()}
    safetensors.torch.save_file(tensors, tmp_path / WEIGHT_NAME)
    lora = load_diffusers_lora(tmp_path, base[0])
    assert lora.scale == 1.0
    ours = ours_out(base, lora)
    for via in ("pipeline", "load_lora_adapter"):
        assert rel_err(torch_out(diffusers_loads(tmp_path, via), base[2]), ours) <= TOL, via
    assert rel_err(torch_out(model, base[2]), ours) > 0.1  # alpha 8 was dropped, as diffusers drops it


def test_alpha_tensors_in_file(base, tmp_path):
    """musubi/ComfyUI-style files: "diffusion_model." keys and `<module>.alpha` tensors, which the pipeline
    loader turns into a scale of alpha / rank per module."""
    model, _ = peft_model(seed=3)
    tensors = {f"diffusion_model.{k}": v.numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        alpha = 6.0 if "proj_out" in key else 2.0
        tensors[key.replace(".lora_A.weight", ".alpha")] = np.array(alpha, np.float32)
    save_file(tensors, tmp_path / WEIGHT_NAME)
    lora = load_diffusers_lora(tmp_path, base[0])
    assert lora.scale == 0.5  # the most common alpha / r; proj_out's 1.5 is folded into its b
    ref = torch_out(diffusers_loads(tmp_path, "pipeline"), base[2])
    assert rel_err(ours_out(base, lora), ref) <= TOL


def test_bad_files_and_targets_name_what_is_wrong(base, tmp_path):
    cfg = base[0]
    good = save_diffusers_lora(random_lora(cfg), cfg, tmp_path / "good")
    tensors, metadata = read_file(good)

    def broken(name, edit):
        t = dict(tensors)
        edit(t)
        save_file(t, tmp_path / name, metadata=metadata)
        return tmp_path / name

    d = cfg.inner_dim
    unknown = "transformer.transformer_blocks.0.attn.to_zz.lora_A.weight"
    past_last = "transformer.transformer_blocks.2.attn.to_q.lora_A.weight"
    misshaped = "transformer.transformer_blocks.1.attn.to_k.lora_A.weight"
    file = broken("bad.safetensors", lambda t: t.update({unknown: np.zeros((4, d), np.float32),
                                                         past_last: np.zeros((4, d), np.float32),
                                                         misshaped: np.zeros((4, d + 1), np.float32)}))
    with pytest.raises(ValueError) as err:
        load_diffusers_lora(file, cfg)
    for text in ("bad.safetensors", unknown, past_last, misshaped, f"expected (4, {d})"):
        assert text in str(err.value)

    orphan = "transformer.proj_out.lora_A.weight"
    file = broken("orphan.safetensors", lambda t: t.pop("transformer.proj_out.lora_B.weight"))
    with pytest.raises(ValueError, match=f"{orphan}: its lora_B is missing"):
        load_diffusers_lora(file, cfg)

    meta = json.loads(metadata[METADATA_KEY])
    file = tmp_path / "rank.safetensors"
    save_file(tensors, file, metadata={METADATA_KEY: json.dumps({**meta, "transformer.rank_pattern": {}})})
    with pytest.raises(ValueError, match="transformer.img_in.lora_A.weight: rank 2 in the weights, 4 in the"):
        load_diffusers_lora(file, cfg)

    with pytest.raises(ValueError, match=r"\['to_nowhere', 'ff.net'\] match no Linear"):
        init_lora(cfg, LoraConfig(targets=("attn.to_q", "to_nowhere", "ff.net")), jax.random.key(0))


def test_init_lora_is_identity_and_trains_only_a_and_b(base):
    cfg = base[0]
    lora = init_lora(cfg, LoraConfig(rank=4, alpha=8.0, targets=PEFT_TARGETS), jax.random.key(0))
    assert np.abs(ours_out(base, lora) - ours_out(base, None)).max() == 0.0

    def loss(lora):
        return jnp.mean(jnp.square(ours_out(base, lora)))

    grads = jax.jit(jax.grad(loss))(lora)
    assert isinstance(grads, Lora) and grads.scale == lora.scale == 2.0
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == 2 * len(PEFT_TARGETS)
    assert {path[-1].key for path, _ in leaves} == {"a", "b"}
    # The text stream's output after the last block is discarded (only image tokens reach proj_out), so
    # there the text-query and text-output projections get no gradient, in diffusers as in ours.
    dead_in_last_block = {"add_q_proj", "to_add_out"}
    for path, g in leaves:
        name = jax.tree_util.keystr(path)
        g = np.abs(np.asarray(g)).reshape(-1, *g.shape[-2:]).max(axis=(1, 2))  # per block (or 1)
        if path[-1].key == "a":  # b = 0 at init: a has no gradient yet
            assert (g == 0).all(), name
        elif path[-2].key in dead_in_last_block:
            assert (g[:-1] > 0).all() and g[-1] == 0, name
        else:  # every block's b learns
            assert (g > 0).all(), name
