"""The demo's trainer plugins: the shapes condition source (deterministic by step, resumable, host rows, the
judge reads the original instruction) and the editor's exact decoder."""

import numpy as np

from cogniedit_jax import config as config_lib
from cogniedit_jax.data import shapes
from cogniedit_jax.demo import plugin, run
from cogniedit_jax.sidecar.parsing import parse_decomposition


def load(*overrides):
    config = config_lib.load_config(run.DEFAULT_CONFIG, list(overrides))
    config_lib.validate(config)
    return config


def test_conditions_are_a_resumable_function_of_the_step():
    config = load("data.batch_size=4")
    source = plugin.conditions(config, None)
    batches = iter(source)
    first, second = next(batches), next(batches)
    assert source.state_dict() == {"step": 2}
    resumed = plugin.conditions(config, None)
    resumed.load_state_dict({"step": 1})
    again = next(iter(resumed))
    assert again["instructions"] == second["instructions"] != first["instructions"]
    np.testing.assert_array_equal(again["cond"].source_latents, second["cond"].source_latents)
    assert second["cond"].prompt_embeds.shape[:2] == second["cond"].prompt_mask.shape == (4, 32)
    assert second["layout"] == ((1, 6, 6), (1, 6, 6)) and second["valid"].all()
    # Host 1 of 2 gets rows 2-3 of the same global batch.
    half = plugin.conditions(config, None, process_index=1, process_count=2).batch_at(1)
    assert half["instructions"] == second["instructions"][2:]


def test_enhanced_conditions_encode_the_decomposer_answer_and_keep_the_original_for_the_judge():
    config = load("data.enhanced=True", "data.batch_size=3")
    source = plugin.conditions(config, None)
    batch = source.batch_at(0)
    rng = np.random.default_rng([0, 0])  # (seed, step)
    examples = [shapes.random_example(rng, 0.2) for _ in range(3)]
    assert batch["instructions"] == [ex.instruction for ex in examples]
    answers = [parse_decomposition(shapes.decompose_scene(ex.source, ex.instruction), ex.instruction).answer
               for ex in examples]
    expected = source.ed.condition(batch["sources"], answers)
    np.testing.assert_array_equal(batch["cond"].prompt_embeds, np.asarray(expected.prompt_embeds))


def test_editor_plugin_decodes_packed_latents_exactly():
    config = load()
    ed = plugin.editor(config)
    images = np.stack([shapes.render(ex.source) for ex in shapes.make_examples(1, 2)])
    latents = plugin.demo_editor(config).condition(images, ["remove one triangle"] * 2).source_latents
    np.testing.assert_array_equal(ed.decode(np.asarray(latents), (12, 12)), images)
