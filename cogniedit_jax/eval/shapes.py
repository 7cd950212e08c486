"""The demo's shapes world as a third benchmark: held-out synthetic edits (`data.shapes.make_examples`), edited
at the world's own image size by the demo editor, scored by the shapes rule judge (the reward's 1-5 scores
and whether the edit is exactly right), summarised as the demo's held-out report does
(`demo.evaluation.summarize`). `--data SEED:N` names the examples: SEED 10000 is the demo's held-out seed."""

from __future__ import annotations

import jax

from cogniedit_jax.data import shapes
from cogniedit_jax.eval.items import EvalItem, png_bytes
from cogniedit_jax.sidecar.parsing import JudgeParseError, reward_from_scores

SCORE_KEYS = ("alignment", "coherence", "style", "consistency")
DEFAULT_DATA = "10000:64"


def load_shapes(spec: str) -> list[EvalItem]:
    """N held-out examples of seed SEED from "SEED:N"; the source travels as PNG bytes."""
    seed, sep, n = str(spec).partition(":")
    if not sep or not seed.isdigit() or not n.isdigit() or int(n) < 1:
        raise ValueError(f"--data {spec!r}: the shapes benchmark takes SEED:N (e.g. {DEFAULT_DATA})")
    return [EvalItem(id=f"shapes/{seed}/{i}", group="+".join(shapes.instruction_attributes(ex.edits)),
                     instruction=ex.instruction, source=png_bytes(shapes.render(ex.source)),
                     meta={"attributes": list(shapes.instruction_attributes(ex.edits))})
            for i, ex in enumerate(shapes.make_examples(int(seed), int(n)))]


def judge_shapes(chat, items, sources, edits, retries: int = 0) -> list[dict]:
    """The rule judge on each edit (no model, so `chat` and `retries` are unused); an instruction the judge
    refuses (`JudgeParseError`) leaves the item unscored and says why."""
    out = []
    for it, src, edit in zip(items, sources, edits, strict=True):
        try:
            s = shapes.score_edit(edit, src, it.instruction)
        except JudgeParseError as e:
            out.append({"scores": None, "judge_failed": ["rule"], "judge": {"rule": {"error": str(e)}}})
            continue
        scores = {k: s[k] for k in SCORE_KEYS}
        out.append({"scores": {**scores, "reward": reward_from_scores(scores), "exact": float(s["exact"])},
                    "judge_failed": [], "judge": {}})
    return out


def shapes_summary(records: list[dict]) -> dict:
    """`demo.evaluation.summarize` over the scored items (mean reward and scores, the exact fraction overall and
    per attribute), with every item counted by status."""
    from cogniedit_jax.demo.evaluation import summarize
    from cogniedit_jax.eval.aggregate import status_counts

    scored = [{**r["scores"], "exact": bool(r["scores"]["exact"]), "attributes": r["meta"]["attributes"]}
              for r in records if r.get("scores")]
    return {**(summarize(scored) if scored else {"num": 0}), "counts": status_counts(records)}


def demo_editor(lora_dir, editor_dir, steps: int, seed: int):
    """edit_fn of the demo editor (`editor_dir`, default: the shipped weights), with a LoRA (and focus) from the
    trainer's export folder. Noise comes from fold_in(seed, batch index)."""
    from pathlib import Path

    from cogniedit_jax.demo.editor import load_editor
    from cogniedit_jax.models.lora import load_diffusers_lora
    from cogniedit_jax.models.token_focus import WEIGHT_NAME as FOCUS_FILE
    from cogniedit_jax.models.token_focus import load_focus

    editor = load_editor(editor_dir)
    lora = load_diffusers_lora(lora_dir, editor.cfg) if lora_dir else None
    focus = load_focus(lora_dir, editor.cfg) if lora_dir and (Path(lora_dir) / FOCUS_FILE).is_file() else None
    batches = [0]

    def edit(images, instructions):
        key = jax.random.fold_in(jax.random.key(seed), batches[0])
        batches[0] += 1
        return editor.edit(images, list(instructions), key, steps, lora, focus)

    return edit
