"""The demo editor and the shapes world as the trainer's plugins (`configs/demo.py`):

    model.source = "cogniedit_jax.demo.plugin:editor"       the pretrained demo MMDiT, decoded exactly
    data.source  = "cogniedit_jax.demo.plugin:conditions"   fresh shapes edits every step
    judge.rule   = "cogniedit_jax.data.shapes:shapes"       the pixel-analysis judge

The demo's own config fields: model.path ("" = the shipped weights), data.enhanced (condition the editor on
the rule decomposer's explicit instruction; the judge always reads the original one), data.combine_p.
"""

from __future__ import annotations

import numpy as np

from cogniedit_jax.data import shapes
from cogniedit_jax.demo import editor as demo
from cogniedit_jax.demo.evaluation import enhanced_instruction
from cogniedit_jax.sampling.edit_loop import EditCondition
from cogniedit_jax.train import StepConditions


def demo_editor(config) -> demo.DemoEditor:
    return demo.load_editor(config.model.path or None, remat_policy=config.model.remat_policy)


def editor(config):
    from cogniedit_jax.train import Editor

    ed = demo_editor(config)
    return Editor(ed.cfg.replace(dtype=config.model.dtype, attention_impl=config.model.attention_impl),
                  ed.params, lambda packed, hw: demo.latents_to_images(packed, hw[0] * ed.fold, ed.fold))


def texts_for(examples, ed: demo.DemoEditor, enhanced: bool) -> list[str]:
    return [enhanced_instruction(ex, ed.text_cfg.max_len) if enhanced else ex.instruction for ex in examples]


class conditions(StepConditions):  # noqa: N801 (named as the config's "module:function" entry)
    """Shapes edits drawn from (seed, step): this host's rows of each global batch, resumable by step."""

    def __init__(self, config, editor, process_index: int = 0, process_count: int = 1):
        super().__init__(config, editor, process_index, process_count)
        self.ed = demo_editor(config)
        self.enhanced, self.combine_p = config.data.enhanced, config.data.combine_p

    def global_batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        examples = [shapes.random_example(rng, self.combine_p) for _ in range(self.config.data.batch_size)]
        sources = np.stack([shapes.render(ex.source) for ex in examples])
        cond = self.ed.condition(sources, texts_for(examples, self.ed, self.enhanced))
        return {"cond": EditCondition(*(np.asarray(x) for x in (cond.prompt_embeds, cond.prompt_mask,
                                                                 cond.source_latents))),
                "layout": self.ed.layout, "sources": sources,
                "instructions": [ex.instruction for ex in examples], "valid": np.ones(len(examples), bool)}
