"""Reading the judges' answers by each benchmark's rules, and the judge calls per item.

Both benchmarks ask for JSON, and both public parsers fall back to guesses: VIEScore draws a random score when
no JSON is found (viescore/utils.py `mllm_output_to_dict(give_up_parsing=True)`), KRIS-Bench takes the first
lone digit 1-5 anywhere in the text and truncates decimals (`extract_*_score` in metrics_knowledge.py). Here a
score is read only next to its own key, checked for count and range, and conflicting repeats are refused; an
unreadable answer raises `JudgeParseError`, is asked again with sampling a bounded number of times, and then
the item is marked failed and reported. No score is ever invented.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable

import numpy as np
from PIL import Image

from cogniedit_jax.eval import prompts
from cogniedit_jax.eval.items import load_image
from cogniedit_jax.sidecar.judge import score_with_retries
from cogniedit_jax.sidecar.parsing import JudgeParseError

# (turns, attempt) -> one answer per turn; attempt 0 must be greedy, later attempts sample.
Chat = Callable[[list[list[dict]], int], list[str]]

VIE_RANGE = (0.0, 10.0)  # VIEScore's scale (tie_rule_SC, rule_PQ: "From scale 0 to 10")
KRIS_RANGE = (1.0, 5.0)  # KRIS-Bench's rubrics ("Evaluation Scale (1 to 5)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def clean_answer(text: str) -> str:
    """Undo formatting that hides keys and numbers: full-width characters (NFKC), code fences, bold/italic
    stars, headings. Underscores stay: KRIS-Bench's keys contain them."""
    text = unicodedata.normalize("NFKC", text)
    text = re.sub(r"```[a-zA-Z]*", " ", text)
    return re.sub(r"[*#`]+", " ", text)


def _number(token: str, what: str, bounds: tuple[float, float]) -> float:
    token = token.strip().strip('"\'')
    if not _NUMBER.fullmatch(token):
        raise JudgeParseError(f"{what} is {token!r}, not a number")
    value = float(token)
    if not bounds[0] <= value <= bounds[1]:
        raise JudgeParseError(f"{what} {value:g} is outside {bounds[0]:g}-{bounds[1]:g}")
    return value


_VIE_LIST = re.compile(r"\"?\bscore\b\"?\s*[:=]\s*\[([^\[\]]*)\]", re.IGNORECASE)


def parse_vie_scores(text: str, count: int = 2) -> list[float]:
    """VIEScore's `{"score": [a, b], "reasoning": ...}`: the list under the key "score" (or, as VIEScore also
    accepts, an answer that is nothing but the list), `count` numbers in 0-10."""
    cleaned = clean_answer(text)
    lists = _VIE_LIST.findall(cleaned)
    if not lists and re.fullmatch(r"\s*\[[^\[\]]*\]\s*", cleaned):
        lists = [cleaned.strip()[1:-1]]
    if not lists:
        raise JudgeParseError('no "score": [...] list in the answer')
    found = {tuple(_number(t, "score", VIE_RANGE) for t in raw.split(",")) for raw in lists}
    if len(found) > 1:
        raise JudgeParseError(f"conflicting score lists: {sorted(found)}")
    scores = list(found.pop())
    if len(scores) != count:
        raise JudgeParseError(f"expected {count} scores, found {len(scores)}: {scores}")
    return scores


def parse_kris_scores(text: str, keys: tuple[str, ...]) -> dict[str, float]:
    """KRIS-Bench's `{"<key>_score": X, ...}` for each key (e.g. ("instruction", "knowledge")), 1-5 each,
    read only where the key names it ("instruction_score": 4, Instruction Score: 4)."""
    cleaned = clean_answer(text)
    out = {}
    for key in keys:
        pattern = rf"\b{key}[\s_]*score\b\s*\"?\s*[:=]\s*\"?\s*([A-Za-z]+\b|-?\d+(?:\.\d+)?)"
        found = {_number(m, f"{key}_score", KRIS_RANGE) for m in re.findall(pattern, cleaned, re.IGNORECASE)}
        if not found:
            raise JudgeParseError(f"no {key}_score in the answer")
        if len(found) > 1:
            raise JudgeParseError(f"conflicting {key}_score values: {sorted(found)}")
        out[key] = found.pop()
    return out


def ask(chat: Chat, turns: list[list[dict]], parse: Callable[[str], dict], retries: int) -> list[dict]:
    """One result per turn, `{"valid", "scores", "attempts", "text", "error"}` (the sidecar judge's format)."""
    return score_with_retries(lambda idx, attempt: chat([turns[i] for i in idx], attempt), len(turns), retries,
                              parse)


def _record(scores: dict, calls: dict) -> dict:
    """An item's judge record: its scores (None where a call failed), each call's answer and error."""
    failed = sorted(name for name, r in calls.items() if not r["valid"])
    return {"scores": scores, "judge_failed": failed,
            "judge": {name: {k: r[k] for k in ("attempts", "text", "error")} for name, r in calls.items()}}


def judge_gedit(chat: Chat, items, sources, edits, retries: int = 2) -> list[dict]:
    """SC and PQ per item as VIEScore's "tie" task computes them (viescore/__init__.py `evaluate`):
    SC = min(editing success, over-editing), PQ = min(naturalness, artifacts), O = sqrt(SC * PQ), all 0-10.
    The edit is first resized to the source's size (Step1X-Edit GEdit-Bench test_gedit_score.py resizes the
    edited image to the source image's size with PIL's default filter). When either call fails, the item has
    no scores: the reference scores a sample only with both (its retry loop redoes both)."""
    resized = [np.asarray(Image.fromarray(e).resize(s.shape[1::-1])) for e, s in zip(edits, sources, strict=True)]
    sc = ask(chat, [prompts.gedit_sc_turn(s, e, it.instruction) for it, s, e in zip(items, sources, resized)],
             lambda t: {"scores": parse_vie_scores(t)}, retries)
    pq = ask(chat, [prompts.gedit_pq_turn(e) for e in resized], lambda t: {"scores": parse_vie_scores(t)}, retries)
    out = []
    for a, b in zip(sc, pq):
        scores = None
        if a["valid"] and b["valid"]:
            s, q = min(a["scores"]["scores"]), min(b["scores"]["scores"])
            scores = {"SC": s, "PQ": q, "O": math.sqrt(s * q)}
        out.append(_record(scores, {"SC": a, "PQ": b}))
    return out


def _kris_if_call(item, source, edited) -> tuple[list[dict], tuple[str, ...]]:
    """The instruction-following turn of one KRIS item and the keys its answer holds. Differences from the
    reference scripts, each a bug there: they read `instruction`/`explain`, but annotation.json has `ins_en` /
    `explain_en`, so the judge got empty strings; the anomaly prompt is chosen by `"abnormality_correction" in
    category` and the view prompt by `category == "view_pair"`, names that match no folder, so neither ever ran.
    Here each runs on its folder (anomaly_correction, viewpoint_change), as the prompts were written for."""
    if item.meta["knowledge"]:
        return prompts.kris_turn("kris_dual", source, edited, instruct=item.instruction,
                                 explanation=item.meta["explain"]), ("instruction", "knowledge")
    if item.group == "anomaly_correction":
        return prompts.kris_turn("kris_abnormal", source, edited, instruct=item.instruction,
                                 explanation=item.meta["explain"]), ("instruction",)
    if item.group == "viewpoint_change":
        return prompts.kris_turn("kris_view", source, edited, load_image(item.truth), instruct=item.instruction), ("instruction",)
    return prompts.kris_turn("kris_instruction", source, edited, instruct=item.instruction), ("instruction",)


def _score(result: dict, key: str) -> float | None:
    return result["scores"][key] if result["valid"] else None


def judge_kris(chat: Chat, items, sources, edits, retries: int = 2) -> list[dict]:
    """VC, VQ, IF (and KP on the knowledge folders) on 1-5, one call each (KP shares IF's call), as
    metrics_common.py / metrics_knowledge.py / metrics_view_change.py ask them. Each metric stands alone: a
    failed call leaves only its own metric(s) empty (None), as in the reference's metrics.json.

    KP is kept as the judge gives it. The dual prompt tells the judge to set KP = 1 when IF <= 2, and the
    reference scripts rely on that without enforcing it; so do we (an answer that breaks the rule is kept)."""
    vc = ask(chat, [prompts.kris_turn("kris_consistency", s, e, instruct=it.instruction)
                    for it, s, e in zip(items, sources, edits)],
             lambda t: parse_kris_scores(t, ("consistency",)), retries)
    vq = ask(chat, [prompts.kris_turn("kris_quality", edited=e) for e in edits],
             lambda t: parse_kris_scores(t, ("quality",)), retries)
    calls = [_kris_if_call(it, s, e) for it, s, e in zip(items, sources, edits)]
    by_keys: dict[tuple, list[int]] = {}
    for i, (_, keys) in enumerate(calls):
        by_keys.setdefault(keys, []).append(i)
    fi: list[dict] = [{}] * len(items)
    for keys, idx in by_keys.items():
        for i, r in zip(idx, ask(chat, [calls[i][0] for i in idx], lambda t, k=keys: parse_kris_scores(t, k), retries)):
            fi[i] = r
    out = []
    for it, a, b, c in zip(items, vc, vq, fi):
        scores = {"VC": _score(a, "consistency"), "VQ": _score(b, "quality"), "IF": _score(c, "instruction")}
        if it.meta["knowledge"]:
            scores["KP"] = _score(c, "knowledge")
        out.append(_record(scores, {"VC": a, "VQ": b, "IF": c}))
    return out
