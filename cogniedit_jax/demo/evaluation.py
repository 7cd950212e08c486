"""Judging the demo editor on held-out shapes edits: rewards (R = A + Co + Cs, 3-15), exact edits per
attribute, and image grids."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from PIL import Image

from cogniedit_jax.data import shapes
from cogniedit_jax.sidecar.parsing import REWARD_KEYS, parse_decomposition, reward_from_scores


def enhanced_instruction(example: shapes.Example, max_words: int) -> str:
    """The rule decomposer's explicit instruction (its <answer>) for an example, or the original where the
    explicit one is longer than `max_words` (the editor's text length; ~1 % of examples at 32)."""
    answer = parse_decomposition(shapes.decompose_scene(example.source, example.instruction),
                                 example.instruction).instruction
    return answer if len(shapes.instruction_words(answer)) <= max_words else example.instruction


def judge_images(images, examples: list[shapes.Example]) -> list[dict]:
    """The shapes judge's scores of each edited image against its example's source and original
    instruction."""
    return [shapes.score_edit(img, shapes.render(ex.source), ex.instruction)
            for img, ex in zip(images, examples)]


def summarize(scores: list[dict]) -> dict:
    """Mean reward and scores, the fraction of exact edits overall and per attribute (colour, position,
    quantity: over the examples whose instruction involves it)."""
    out = {"num": len(scores),
           "reward_mean": float(np.mean([reward_from_scores(s) for s in scores])),
           **{k: float(np.mean([s[k] for s in scores])) for k in REWARD_KEYS},
           "exact": float(np.mean([s["exact"] for s in scores]))}
    out["exact_per_attribute"] = {
        a: float(np.mean([s["exact"] for s in scores if a in s["attributes"]]))
        for a in shapes.ATTRIBUTES if any(a in s["attributes"] for s in scores)}
    return out


def edit_examples(editor, examples: list[shapes.Example], key, steps: int = 8, batch_size: int = 32,
                  enhanced: bool = False, lora=None, focus=None) -> np.ndarray:
    """The editor's edits of the examples' sources (uint8 [N, H, W, 3]); `enhanced` gives it the rule
    decomposer's explicit instructions instead of the originals. Batch i uses fold_in(key, i)."""
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        texts = [enhanced_instruction(ex, editor.text_cfg.max_len) if enhanced else ex.instruction
                 for ex in chunk]
        sources = np.stack([shapes.render(ex.source) for ex in chunk])
        out.append(editor.edit(sources, texts, jax.random.fold_in(key, i // batch_size), steps, lora, focus))
    return np.concatenate(out)


def baseline_summaries(examples: list[shapes.Example]) -> dict:
    """The judge on the exact targets (the ceiling) and on unedited sources (nothing done)."""
    return {"targets": summarize(judge_images([shapes.render(ex.target) for ex in examples], examples)),
            "sources": summarize(judge_images([shapes.render(ex.source) for ex in examples], examples))}


def save_grid(path, columns: list[np.ndarray], scale: int = 4, gap: int = 2) -> Path:
    """A PNG with one row per example and one column per image set (each uint8 [N, H, W, 3])."""
    n, h, w, _ = columns[0].shape
    grid = np.full((n * (h + gap) + gap, len(columns) * (w + gap) + gap, 3), 255, np.uint8)
    for c, images in enumerate(columns):
        for r in range(n):
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            grid[y:y + h, x:x + w] = images[r]
    path = Path(path)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    return path
