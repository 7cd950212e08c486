"""Supervised flow-matching pretraining of the demo editor on synthetic shapes edits.

    python -m cogniedit_jax.demo.pretrain --config configs/demo_pretrain.py --out DIR [--config.train.steps=N]

Each step draws fresh (source, instruction, target) examples; half the instructions are replaced by the rule
decomposer's explicit form, so the editor reads both. The loss is the pipeline's flow matching:
sigma = t ~ U(0, 1), x_t = (1 - t) x0 + t noise, the model predicts noise - x0 from [x_t, source] tokens and
the text. The MMDiT starts adaLN-zero (modulation and output projection zero): every block starts as the
identity.
Writes the editor (`editor.save_editor`) to DIR, DIR/pretrain.json (losses, timings, held-out judge) and
DIR/heldout.png (source | target | edit).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from cogniedit_jax.data import shapes
from cogniedit_jax.demo import editor as demo
from cogniedit_jax.demo import evaluation
from cogniedit_jax.models import init_params, transformer_forward

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/demo_pretrain.py", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "output folder")

ZERO_INIT = ("img_mod", "txt_mod", "norm_out", "proj_out")


def init_editor(config, key) -> demo.DemoEditor:
    cfg = demo.model_config(config.fold, **config.model, remat_policy="none")
    k1, k2 = jax.random.split(key)
    params = init_params(cfg, k1)
    for name in ZERO_INIT:
        tree = params["blocks"] if name.endswith("_mod") else params
        tree[name] = jax.tree.map(jnp.zeros_like, tree[name])
    text_cfg = demo.TextConfig(shapes.vocabulary(), config.text.max_len, cfg.joint_attention_dim)
    return demo.DemoEditor(cfg, params, text_cfg, demo.init_text_params(text_cfg, k2), config.fold)


def make_batch(rng: np.random.Generator, editor: demo.DemoEditor, batch_size: int, data) -> dict:
    """Latents of sources and targets and word ids [B, max_len] (one shape: one compilation)."""
    examples = [shapes.random_example(rng, data.combine_p) for _ in range(batch_size)]
    texts = [evaluation.enhanced_instruction(ex, editor.text_cfg.max_len) if rng.random() < data.enhanced_p
             else ex.instruction for ex in examples]
    render = lambda scenes: np.stack([shapes.render(s) for s in scenes])  # noqa: E731
    return {"source": demo.images_to_latents(render([ex.source for ex in examples]), editor.fold),
            "target": demo.images_to_latents(render([ex.target for ex in examples]), editor.fold),
            "ids": jnp.asarray(demo.tokenize(editor.text_cfg, texts))}


def flow_matching_loss(cfg, layout, trainable, batch, key):
    x0, source = batch["target"], batch["source"]
    k1, k2 = jax.random.split(key)
    t = jax.random.uniform(k1, x0.shape[:1])
    noise = jax.random.normal(k2, x0.shape)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    embeds, mask = demo.encode_text(trainable["text"], batch["ids"])
    out = transformer_forward(cfg, trainable["mmdit"], jnp.concatenate([x_t, source], 1), embeds, mask, t,
                              [layout] * x0.shape[0])
    return jnp.mean(jnp.square(out[:, : x0.shape[1]] - (noise - x0)))


def train(config, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(config.seed)
    key, init_key = jax.random.split(key)
    editor = init_editor(config, init_key)
    if config.init:  # continue from a saved editor (its weights; the recipe's architecture must match)
        start = demo.load_editor(config.init)
        if (start.cfg, start.text_cfg, start.fold) != (editor.cfg, editor.text_cfg, editor.fold):
            raise ValueError(f"init={config.init}: its architecture differs from this recipe's "
                             f"({start.cfg} vs {editor.cfg})")
        editor = dataclasses.replace(editor, params=start.params, text_params=start.text_params)
    tc = config.train
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup_steps, tc.steps)
    optimizer = optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                            optax.adamw(schedule, weight_decay=tc.weight_decay))
    trainable = {"mmdit": editor.params, "text": editor.text_params}
    opt_state = optimizer.init(trainable)

    @jax.jit
    def step(trainable, opt_state, batch, key):
        loss, grads = jax.value_and_grad(flow_matching_loss, argnums=2)(editor.cfg, editor.layout, trainable,
                                                                         batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    rng = np.random.default_rng(config.seed)
    losses, start = [], time.perf_counter()
    for i in (bar := tqdm(range(tc.steps), desc="pretrain")):
        batch = make_batch(rng, editor, tc.batch_size, config.data)
        trainable, opt_state, loss = step(trainable, opt_state, batch, jax.random.fold_in(key, i))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    train_s = time.perf_counter() - start

    editor = dataclasses.replace(editor, params=trainable["mmdit"], text_params=trainable["text"])
    report = {"train_seconds": train_s, "loss_first20": float(np.mean(losses[:20])),
              "loss_last20": float(np.mean(losses[-20:])), "losses": losses}
    report["heldout"] = heldout_report(editor, config.eval, out)
    editor = dataclasses.replace(editor, meta={"recipe": config.to_dict(), "train_seconds": train_s,
                                               "heldout": report["heldout"]})
    demo.save_editor(editor, out)
    (out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def heldout_report(editor, ev, out: Path) -> dict:
    """The judge on held-out examples: the editor with the original and with the decomposer's explicit
    instructions, the exact targets and the unedited sources."""
    examples = shapes.make_examples(ev.seed, ev.num)
    key = jax.random.key(ev.seed)
    start = time.perf_counter()
    edited = evaluation.edit_examples(editor, examples, key, ev.steps)
    seconds = time.perf_counter() - start
    enhanced = evaluation.edit_examples(editor, examples, key, ev.steps, enhanced=True)
    report = {"seed": ev.seed, "steps": ev.steps, "edit_seconds": seconds,
              "editor": evaluation.summarize(evaluation.judge_images(edited, examples)),
              "editor_enhanced": evaluation.summarize(evaluation.judge_images(enhanced, examples)),
              **evaluation.baseline_summaries(examples)}
    n = ev.grid
    evaluation.save_grid(out / "heldout.png", [np.stack([shapes.render(ex.source) for ex in examples[:n]]),
                                               np.stack([shapes.render(ex.target) for ex in examples[:n]]),
                                               edited[:n], enhanced[:n]])
    return report


def main(argv):
    del argv
    if not _OUT.value:
        raise app.UsageError("--out DIR is required")
    report = train(_CONFIG.value, Path(_OUT.value))
    h = report["heldout"]
    print(json.dumps({k: (v["reward_mean"] if isinstance(v, dict) else v) for k, v in h.items()}, indent=1))


if __name__ == "__main__":
    app.run(main)
