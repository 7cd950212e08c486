"""The demo editor: pixel latents, the word-level text encoder, pretraining end to end (micro recipe), saving
and loading, and the shipped weights."""

from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from cogniedit_jax.data import shapes
from cogniedit_jax.demo import editor as demo
from cogniedit_jax.demo import evaluation, pretrain


@pytest.mark.parametrize("fold", [2, 3])
def test_pixel_latents_round_trip_exactly(fold):
    images = np.stack([shapes.render(ex.source) for ex in shapes.make_examples(0, 3)])
    latents = demo.images_to_latents(images, fold)
    size = shapes.IMAGE_SIZE
    assert latents.shape == (3, (size // (2 * fold)) ** 2, 12 * fold ** 2)
    assert float(abs(latents).max()) <= 1.0
    np.testing.assert_array_equal(demo.latents_to_images(latents, size, fold), images)
    with pytest.raises(ValueError, match="multiples of 2 x fold = 6"):
        demo.images_to_latents(np.zeros((1, 32, 32, 3), np.uint8), 3)


def test_text_encoder_pads_with_zeros_and_refuses_unknown_words():
    cfg = demo.TextConfig(shapes.vocabulary(), max_len=8, dim=4)
    ids = demo.tokenize(cfg, ["remove one triangle", "Make the square red."])
    assert ids.shape == (2, 8) and (ids[0, :3] > 0).all() and (ids[0, 3:] == 0).all()
    embeds, mask = demo.encode_text(demo.init_text_params(cfg, jax.random.key(0)), ids)
    np.testing.assert_array_equal(mask, ids > 0)
    assert embeds.shape == (2, 8, 4) and float(abs(embeds[0, 3:]).max()) == 0.0
    with pytest.raises(ValueError, match=r"\['hexagon'\] are not in the demo editor's vocabulary"):
        demo.tokenize(cfg, ["remove the hexagon"])
    with pytest.raises(ValueError, match="11 words, the text length is 8"):
        demo.tokenize(cfg, ["move the red square in the top left to the center"])


def micro_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init = ""
    c.fold = 2
    c.model = dict(num_layers=1, num_attention_heads=1, attention_head_dim=16, joint_attention_dim=16,
                   axes_dims_rope=(4, 6, 6))
    c.text = dict(max_len=32)
    c.data = dict(combine_p=0.2, enhanced_p=0.5)
    c.train = dict(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, weight_decay=0.0, clip_norm=1.0)
    c.eval = dict(seed=10_000, num=4, steps=2, grid=2)
    return c


def test_pretrain_writes_an_editor_that_loads_and_edits_the_same(tmp_path):
    report = pretrain.train(micro_config(), tmp_path)
    assert len(report["losses"]) == 3 and np.isfinite(report["losses"]).all()
    h = report["heldout"]
    assert h["targets"]["reward_mean"] == 15 and h["sources"]["alignment"] < 2
    assert (tmp_path / "heldout.png").is_file()
    loaded = demo.load_editor(tmp_path)
    assert loaded.meta["heldout"]["editor"] == h["editor"] and loaded.fold == 2
    examples = shapes.make_examples(10_000, 4)
    again = evaluation.edit_examples(loaded, examples, jax.random.key(10_000), 2)
    first = evaluation.judge_images(again, examples)
    assert evaluation.summarize(first) == h["editor"]


def test_pretrain_continues_from_a_saved_editor_of_the_same_architecture(tmp_path):
    pretrain.train(micro_config(), tmp_path / "first")
    first = demo.load_editor(tmp_path / "first")
    c = micro_config()
    c.init, c.seed, c.train.lr = str(tmp_path / "first"), 1, 0.0  # no step size: the weights carry over as is
    pretrain.train(c, tmp_path / "again")
    again = demo.load_editor(tmp_path / "again")
    for a, b in zip(jax.tree.leaves((first.params, first.text_params)), jax.tree.leaves((again.params,
                                                                                       again.text_params))):
        np.testing.assert_array_equal(a, b)
    c.model.num_layers = 2
    with pytest.raises(ValueError, match=r"init=.*first: its architecture differs"):
        pretrain.train(c, tmp_path / "other")


def test_shipped_editor_loads_and_generates():
    ed = demo.load_editor()
    files = [p for p in demo.WEIGHTS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2 ** 20
    examples = shapes.make_examples(123, 4)
    edited = evaluation.edit_examples(ed, examples, jax.random.key(0), steps=4)
    assert edited.shape == (4, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3) and edited.dtype == np.uint8
    scores = evaluation.judge_images(edited, examples)
    assert all(1 <= s[k] <= 5 for s in scores for k in ("alignment", "coherence", "consistency"))
    # What pretraining measured on held-out edits is shipped with the weights: the editor moves toward the
    # edits (alignment above the unedited sources'), while the exact targets score the maximum.
    h = ed.meta["heldout"]
    assert h["targets"]["reward_mean"] == 15 and h["editor"]["alignment"] > h["sources"]["alignment"]


def test_load_editor_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(Path(tmp_path) / "demo.json")):
        demo.load_editor(tmp_path)
