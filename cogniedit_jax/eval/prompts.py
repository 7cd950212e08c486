"""Each benchmark's own judge prompts, shipped verbatim as package data in `prompts/` (the scores depend on the
exact wording), and the judge turns built from them: the prompt text and the images in each reference
script's order.

A prompt file starts with documentation lines, then a line "---"; everything after it is the prompt.
GEdit-Bench's (VIEScore) prompts take `<instruction>` by plain replacement; KRIS-Bench's are Python format
strings (`{instruct}`, `{explanation}`, literal braces doubled), filled the way its scripts fill them.
"""

from __future__ import annotations

import functools
from importlib import resources

PROMPT_NAMES = ("gedit_sc", "gedit_pq", "kris_consistency", "kris_quality", "kris_instruction", "kris_dual",
                "kris_abnormal", "kris_view")


@functools.cache
def load_prompt(name: str) -> str:
    if name not in PROMPT_NAMES:
        raise ValueError(f"unknown judge prompt {name!r}; known: {PROMPT_NAMES}")
    text = resources.files("cogniedit_jax.eval").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")
    _, sep, body = text.partition("\n---\n")
    if not sep:
        raise ValueError(f"packaged prompt {name}.txt has no '---' line after its documentation")
    return body


def text(t: str) -> dict:
    return {"text": t}


def image(a) -> dict:
    return {"image": a}


# GEdit-Bench: VIEScore's "tie" task (viescore/__init__.py): SC sees [source, edit] with the SC prompt, PQ
# sees the edit alone (`image_prompts[-1]`). Images go before the text, the Qwen2.5-VL chat layout the
# sidecar's own judge uses.
def gedit_sc_turn(source, edited, instruction: str) -> list[dict]:
    return [image(source), image(edited), text(load_prompt("gedit_sc").replace("<instruction>", instruction))]


def gedit_pq_turn(edited) -> list[dict]:
    return [image(edited), text(load_prompt("gedit_pq"))]


# KRIS-Bench: the prompt first, then each image after its caption, as `evaluate_with_gpt` in
# metrics_common.py / metrics_knowledge.py / metrics_view_change.py builds the message; the quality call
# sends the edit alone under "This is the edited image:" (metrics_common.py).
def _kris_images(source=None, edited=None, truth=None) -> list[dict]:
    parts = []
    for caption, a in (("This is the original image:", source), ("This is the edited image:", edited),
                       ("This is the ground truth image:", truth)):
        if a is not None:
            parts += [text(caption), image(a)]
    return parts


def kris_turn(prompt: str, source=None, edited=None, truth=None, **fields) -> list[dict]:
    return [text(load_prompt(prompt).format(**fields)), *_kris_images(source, edited, truth)]
