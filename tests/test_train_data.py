"""The trainer's condition sources without training: the `cache` source (manifest + condition cache) and
the `random` one: shapes, layout, masked rows for missing cache entries, and exact resumption."""

from __future__ import annotations

import json

import jax
import numpy as np
from PIL import Image

from cogniedit_jax.config import load_config
from cogniedit_jax.models import MMDiTConfig
from cogniedit_jax.train import CachedConditions, Editor, RandomConditions, latent_preview

MODEL = MMDiTConfig(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
EDITOR = Editor(MODEL, None, latent_preview)


def write_cache(tmp_path, n=6, missing=("item3",)):
    """n 64x64 sources in a manifest, their conditions in the cache (text lengths 3..), one left out."""
    lines = []
    (tmp_path / "cache").mkdir()
    for i in range(n):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(tmp_path / f"item{i}.png")
        line = {"id": f"item{i}", "source": f"item{i}.png", "instruction": f"edit {i}"}
        if i == 0:
            line["enhanced"] = {"info": "i", "think": "t", "answer": "enhanced 0", "object": "o"}
        lines.append(json.dumps(line))
        if f"item{i}" not in missing:
            np.savez(tmp_path / "cache" / f"item{i}.npz", prompt_embeds=np.full((3 + i, 24), i, np.float32),
                     mask=np.ones(3 + i, np.int64), source_latents=np.zeros((16, 16), np.float32),
                     source_grid=np.array([4, 4]))
    np.savez(tmp_path / "cache" / "negative.npz", prompt_embeds=np.ones((1, 2, 24), np.float32),
             mask=np.ones((1, 2), np.int64))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")


def cache_config(tmp_path):
    return load_config("configs/tiny.py", [
        "data.source=cache", f"data.manifest={tmp_path / 'train.jsonl'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_text_len=16", f"data.target_area={64 * 64}", "data.num_threads=1", "data.batch_size=3"])


def test_cache_source_batches_and_resumes(tmp_path):
    write_cache(tmp_path)
    config = cache_config(tmp_path)
    source = CachedConditions(config, EDITOR)
    batches = iter(source)
    first = next(batches)
    cond = first["cond"]
    assert cond.prompt_embeds.shape == (3, 16, 24) and cond.prompt_mask.shape == (3, 16)
    assert cond.source_latents.shape == (3, 16, 16) and cond.negative_embeds.shape == (3, 2, 24)
    assert first["layout"] == ((1, 4, 4), (1, 4, 4))  # 64 px -> 8x8 latents -> 4x4 tokens, source likewise
    assert first["sources"].shape == (3, 64, 64, 3) and len(first["instructions"]) == 3
    for row, length in zip(cond.prompt_embeds, cond.prompt_mask.sum(1)):  # item i: 3 + i tokens of value i
        assert (row[:length] == length - 3).all() and (row[length:] == 0).all()
    seen = [first] + [next(batches) for _ in range(3)]
    epoch = {t for b in seen[:2] for t in b["instructions"]}
    assert "enhanced 0" in epoch and "edit 0" not in epoch  # the judge reads the decomposed instruction
    invalid = sum(int((~b["valid"]).sum()) for b in seen)
    assert invalid == 2  # item3 is in one batch per epoch, 2 epochs
    assert source.loader.skips.counts["no_cache"] == 2
    state = json.loads(json.dumps(source.state_dict()))
    after = [next(batches) for _ in range(2)]
    resumed = CachedConditions(config, EDITOR)
    resumed.load_state_dict(state)
    for a, b in zip(after, iter(resumed)):
        assert a["instructions"] == b["instructions"]
        np.testing.assert_array_equal(a["cond"].prompt_embeds, b["cond"].prompt_embeds)


def test_too_long_text_is_skipped_and_counted(tmp_path):
    write_cache(tmp_path, missing=())
    config = cache_config(tmp_path)
    config.data.max_text_len = 5  # items 3, 4, 5 have 6, 7, 8 tokens
    source = CachedConditions(config, EDITOR)
    batches = iter(source)
    rows = sum(int((~next(batches)["valid"]).sum()) for _ in range(2))
    assert rows == 3 and source.loader.skips.counts["text_too_long"] == 3


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
