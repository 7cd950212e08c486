"""The trainer's condition sources without training: the `cache` source (manifest + the cache prepare
writes, data/cache.py) and the `random` one: shapes, layout, masked rows for missing or damaged cache entries,
host rows, and exact resumption."""

from __future__ import annotations

import json
import struct

import jax
import numpy as np
import pytest
from PIL import Image

from cogniedit_jax.config import load_config
from cogniedit_jax.data.cache import CacheRecord, CacheWriter
from cogniedit_jax.models import MMDiTConfig
from cogniedit_jax.train import CachedConditions, Editor, RandomConditions, latent_preview, train

MODEL = MMDiTConfig(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
EDITOR = Editor(MODEL, None, latent_preview)
ENHANCED = {"info": "i", "think": "t", "answer": "enhanced 0", "object": "o"}


def write_cache(tmp_path, n=6, missing=("item3",), damaged=()):
    """n 64x64 items in a manifest and (but `missing`) in a cache of 2-record shards, as prepare writes it:
    item i has 3 + i prompt tokens of value i and 2 negative tokens of value 100 + i; item 0 was encoded with
    its enhanced answer. The latents of the `damaged` ids are altered on disk after the write."""
    lines = []
    with CacheWriter(tmp_path / "cache", {"test": True}, shard_size=2) as writer:
        for i in range(n):
            source = np.full((64, 64, 3), 40 * i, np.uint8)
            Image.fromarray(source).save(tmp_path / f"item{i}.png")
            enhanced = ENHANCED if i == 0 else None
            line = {"id": f"item{i}", "source": f"item{i}.png", "instruction": f"edit {i}"}
            lines.append(json.dumps({**line, **({"enhanced": enhanced} if enhanced else {})}))
            if f"item{i}" not in missing:
                writer.add(CacheRecord(
                    id=f"item{i}", bucket=(64, 64), latents=np.full((16, 16), i, np.float32), source=source,
                    prompt_embeds=np.full((3 + i, 24), i, np.float32),
                    negative_embeds=np.full((2, 24), 100 + i, np.float32), instruction=f"edit {i}",
                    prompt="enhanced 0" if enhanced else f"edit {i}", enhanced=enhanced))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    for shard in index["shards"]:
        for row, rec in enumerate(shard["records"]):
            if rec["id"] in damaged:
                _flip_byte(tmp_path / "cache" / shard["file"], f"{row}/latents")


def _flip_byte(path, name):
    """Alters the first byte of tensor `name` in a safetensors file (header size, JSON header, data)."""
    data = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    start = 8 + size + json.loads(data[8:8 + size])[name]["data_offsets"][0]
    data[start] ^= 0xFF
    path.write_bytes(bytes(data))


def cache_config(tmp_path, *overrides):
    return load_config("configs/tiny.py", [
        "data.source=cache", f"data.manifest={tmp_path / 'train.jsonl'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_text_len=16", "data.num_threads=1", "data.batch_size=3", *overrides])


def test_cache_source_batches_and_resumes(tmp_path):
    write_cache(tmp_path, n=7, damaged=("item5",))  # 6 cached items: 2 batches of 3 per epoch
    config = cache_config(tmp_path)
    source = CachedConditions(config, EDITOR)
    assert source.loader.skips.counts["no_cache"] == 1  # item3, left out of the plan
    batches = iter(source)
    first = next(batches)
    cond = first["cond"]
    assert cond.prompt_embeds.shape == (3, 16, 24) and cond.prompt_mask.shape == (3, 16)
    assert cond.source_latents.shape == (3, 16, 16) and cond.negative_embeds.shape == (3, 16, 24)
    assert first["layout"] == ((1, 4, 4), (1, 4, 4))  # 64 px -> 8x8 latents -> 4x4 tokens, source likewise
    assert first["sources"].shape == (3, 64, 64, 3) and first["sources"].dtype == np.uint8
    assert len(first["instructions"]) == 3
    for row in range(3):  # item i: 3 + i tokens of value i, its own negative, its own source and latents
        i = int(cond.prompt_mask[row].sum()) - 3
        assert (cond.prompt_embeds[row, :3 + i] == i).all() and (cond.prompt_embeds[row, 3 + i:] == 0).all()
        assert cond.negative_mask[row].tolist() == [1, 1] + [0] * 14
        assert (cond.negative_embeds[row, :2] == 100 + i).all() and (cond.negative_embeds[row, 2:] == 0).all()
        assert (first["sources"][row] == 40 * i).all() and (cond.source_latents[row] == i).all()
    seen = [first] + [next(batches) for _ in range(3)]
    epoch = {t for b in seen[:2] for t in b["instructions"]}
    assert "enhanced 0" in epoch and "edit 0" not in epoch  # the judge reads the text that was encoded
    invalid = sum(int((~b["valid"]).sum()) for b in seen)
    assert invalid == 2  # item5 (damaged) is in one batch per epoch, 2 epochs
    assert source.loader.skips.counts["corrupt_cache"] == 2
    state = json.loads(json.dumps(source.state_dict()))
    after = [next(batches) for _ in range(2)]
    resumed = CachedConditions(config, EDITOR)
    resumed.load_state_dict(state)
    assert dict(resumed.loader.skips.counts) == {"no_cache": 1, "corrupt_cache": 2} == state["skipped"]
    for a, b in zip(after, iter(resumed)):
        assert a["instructions"] == b["instructions"]
        np.testing.assert_array_equal(a["valid"], b["valid"])
        np.testing.assert_array_equal(a["cond"].prompt_embeds, b["cond"].prompt_embeds)


def test_cache_source_splits_hosts(tmp_path):
    write_cache(tmp_path, missing=())
    config = cache_config(tmp_path, "data.batch_size=2")
    whole = next(iter(CachedConditions(config, EDITOR)))
    halves = [next(iter(CachedConditions(config, EDITOR, p, 2))) for p in range(2)]
    joined = jax.tree.map(lambda *x: np.concatenate(x), *[h["cond"] for h in halves])
    np.testing.assert_array_equal(joined.prompt_embeds, whole["cond"].prompt_embeds)
    np.testing.assert_array_equal(joined.negative_embeds, whole["cond"].negative_embeds)
    assert halves[0]["instructions"] + halves[1]["instructions"] == whole["instructions"]


def test_too_long_text_is_skipped_and_counted(tmp_path):
    write_cache(tmp_path, missing=())
    config = cache_config(tmp_path, "data.max_text_len=5")  # items 3, 4, 5 have 6, 7, 8 tokens
    source = CachedConditions(config, EDITOR)
    batches = iter(source)
    rows = sum(int((~next(batches)["valid"]).sum()) for _ in range(2))
    assert rows == 3 and source.loader.skips.counts["text_too_long"] == 3
    assert next(batches)["cond"].prompt_embeds.shape == (3, 5, 24)


@pytest.mark.slow  # ~50 s on 2 busy cores: compiles the tiny trainer
def test_trainer_runs_on_the_cache(tmp_path):
    write_cache(tmp_path, n=7, damaged=("item5",))
    # preview_scale = vae_scale, so the random editor's decoded edits have the sources' size, as a VAE's do
    config = cache_config(tmp_path, "total_steps=2", "data.max_text_len=0", "log.grid_every=0",
                          "model.preview_scale=8")
    result = train(config, tmp_path / "run")
    assert result["step"] == 2 and np.isfinite(result["loss"]) and np.isfinite(result["reward_mean"])
    assert result["bad_examples"] == 1 and result["invalid_rewards"] == 2  # item5's row, G = 2 samples


def test_random_source_is_a_function_of_seed_and_step_and_splits_hosts():
    config = load_config("configs/tiny.py")
    a = RandomConditions(config, EDITOR)
    first, second = next(iter(a)), next(iter(a))
    again = RandomConditions(config, EDITOR)
    again.load_state_dict({"step": 1})
    np.testing.assert_array_equal(next(iter(again))["cond"].prompt_embeds, second["cond"].prompt_embeds)
    assert not np.array_equal(first["cond"].prompt_embeds, second["cond"].prompt_embeds)
    halves = [RandomConditions(config, EDITOR, p, 2).batch_at(0) for p in range(2)]
    joined = jax.tree.map(lambda *x: np.concatenate(x), *[h["cond"] for h in halves])
    np.testing.assert_array_equal(joined.prompt_embeds, first["cond"].prompt_embeds)
    assert halves[1]["instructions"] == first["instructions"][2:]
