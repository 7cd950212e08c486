"""Parsers for the two generative roles (pure Python, no torch): the judge's four scores and the decomposer's
four-part answer, and the reward built from the scores.

Judge answers are read strictly: every score is anchored on its label, checked for range and for conflicts, and
anything doubtful raises `JudgeParseError` (the caller retries, then marks the sample invalid). There is no
fallback score of any kind: public parsers that return a default or grab the first digit ("Step 1 ...") turn
parser failures into rewards.
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata

SCORE_KEYS = ("alignment", "coherence", "style", "consistency")
# The paper's reward (eq. 12) leaves the style score out: it measures appeal, not editing correctness.
REWARD_KEYS = ("alignment", "coherence", "consistency")
SCORE_RANGE = (1.0, 5.0)
REWARD_NORMALIZATIONS = ("sum", "mean", "unit")


class JudgeParseError(ValueError):
    """The judge's answer does not hold exactly one in-range score for each of the four labels."""


_LABEL = r"(?P<label>alignment|coherence|style|consistency)"
# "Alignment Score (1-5): 4", "alignment: 4/5", "Consistency score = 3.5", "Style Score is 4 out of 5".
_SCORE = re.compile(
    rf"\b{_LABEL}(?:\s+score)?\s*(?:\(\s*1\s*(?:-|–|~|to)\s*5\s*\))?\s*(?:[:=\-–]|\bis\b)?\s*"
    r"(?P<value>\d+(?:\.\d+)?)(?!\.?\d)\s*(?:(?:/|out\s+of)\s*(?P<denominator>\d+(?:\.\d+)?))?",
    re.IGNORECASE,
)
# The template's own placeholders (X, Y, Z, W) echoed back instead of numbers.
_PLACEHOLDER = re.compile(
    rf"\b(?i:{_LABEL})(?i:\s+score)?\s*(?:\(\s*1\s*-\s*5\s*\))?\s*[:=]?\s*(?P<letter>[XYZW])\b")


def _clean(text: str) -> str:
    """Undo formatting that hides labels: full-width characters, markdown emphasis, code fences, headings."""
    text = unicodedata.normalize("NFKC", text)
    text = re.sub(r"```[a-zA-Z]*", " ", text)
    return re.sub(r"[*_`#]+", " ", text)


def validate_scores(scores: dict) -> dict:
    """The four scores as floats, each within 1-5; raises `JudgeParseError` naming the key at fault."""
    missing = [k for k in SCORE_KEYS if k not in scores]
    if missing:
        raise JudgeParseError(f"missing score(s): {', '.join(missing)}")
    out = {}
    for key in SCORE_KEYS:
        value = scores[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise JudgeParseError(f"{key} score {value!r} is not a finite number")
        if not SCORE_RANGE[0] <= value <= SCORE_RANGE[1]:
            raise JudgeParseError(f"{key} score {value} is outside {SCORE_RANGE[0]:g}-{SCORE_RANGE[1]:g}")
        out[key] = float(value)
    return out


def parse_judge_scores(text: str) -> dict:
    """{"alignment", "coherence", "style", "consistency"} -> float in [1, 5] from the judge's free-text answer.

    Accepts case, markdown emphasis and headings, full-width colons and digits, "4/5" and "4 out of 5",
    decimals, a label repeated with the same value, and any prose around the scores. Raises `JudgeParseError`
    when a label has no score, a score is outside 1-5 or has another denominator, one label has two different
    scores, or the template's placeholder letters (X, Y, Z, W) come back in place of scores.
    """
    cleaned = _clean(text)
    echoed = sorted({m["label"].lower() for m in _PLACEHOLDER.finditer(cleaned)})
    if echoed:
        raise JudgeParseError(f"the template's placeholder letters were echoed for: {', '.join(echoed)}")
    found: dict[str, set[float]] = {k: set() for k in SCORE_KEYS}
    for m in _SCORE.finditer(cleaned):
        label, value = m["label"].lower(), float(m["value"])
        if m["denominator"] is not None and float(m["denominator"]) != SCORE_RANGE[1]:
            raise JudgeParseError(f"{label} score {m.group(0).strip()!r} is not out of 5")
        found[label].add(value)
    conflicting = {k: sorted(v) for k, v in found.items() if len(v) > 1}
    if conflicting:
        raise JudgeParseError(f"conflicting scores: {conflicting}")
    return validate_scores({k: v.pop() for k, v in found.items() if v})


def reward_from_scores(scores: dict, normalization: str = "sum") -> float:
    """The paper's reward R = alignment + coherence + consistency (eq. 12), in one of three scales:
    "sum" (3-15, the paper's), "mean" (1-5, the average the paper's text mentions), "unit" (0-1)."""
    total = sum(scores[k] for k in REWARD_KEYS)
    if normalization == "sum":
        return total
    if normalization == "mean":
        return total / len(REWARD_KEYS)
    if normalization == "unit":
        low, high = (len(REWARD_KEYS) * bound for bound in SCORE_RANGE)
        return (total - low) / (high - low)
    raise ValueError(f"reward normalization {normalization!r} is not one of {REWARD_NORMALIZATIONS}")


DECOMPOSITION_TAGS = ("info", "think", "answer", "object")


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """The decomposer's four parts (empty when missing). `instruction` is what the editor gets: the enriched
    instruction from <answer>, or the original instruction when there is none (`fallback`)."""

    info: str
    think: str
    answer: str
    object: str
    instruction: str
    fallback: bool
    missing: tuple[str, ...]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "missing": list(self.missing)}


_TAG = re.compile(r"<\s*(/?)\s*(info|think|answer|object)\s*>", re.IGNORECASE)


def parse_decomposition(text: str, instruction: str) -> Decomposition:
    """Reads `<info>…</info> <think>…</think> <answer>…</answer> <object>…</object>` in any order. A part
    whose closing tag is missing runs to the next tag or the end; a part that is missing or empty is listed
    in `missing`. Without a usable <answer> the original instruction is kept and `fallback` is set."""
    parts: dict[str, str] = {}
    marks = list(_TAG.finditer(text))
    for i, mark in enumerate(marks):
        closing, tag = mark.group(1), mark.group(2).lower()
        if closing or tag in parts:
            continue  # the first opening of each tag wins; a repeated one is the model restating itself
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        parts[tag] = text[mark.end():end].strip()
    missing = tuple(t for t in DECOMPOSITION_TAGS if not parts.get(t))
    answer = parts.get("answer", "")
    return Decomposition(info=parts.get("info", ""), think=parts.get("think", ""), answer=answer,
                         object=parts.get("object", ""), instruction=answer or instruction,
                         fallback=not answer, missing=missing)
