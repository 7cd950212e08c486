"""Judge-answer parsing by each benchmark's rules, and aggregation against numbers computed by hand following
the reference scripts (Step1X-Edit GEdit-Bench statistics, KRIS-Bench summarize.py)."""

import math

import pytest

from cogniedit_jax.eval.aggregate import gedit_summary, kris_summary
from cogniedit_jax.eval.prompts import PROMPT_NAMES, gedit_sc_turn, kris_turn, load_prompt
from cogniedit_jax.eval.scoring import ask, parse_kris_scores, parse_vie_scores
from cogniedit_jax.sidecar.parsing import JudgeParseError


@pytest.mark.parametrize("text, scores", [
    ('{\n"score" : [7, 9],\n"reasoning" : "good"\n}', [7, 9]),
    ('```json\n{"score": [3.5, 10], "reasoning": "x"}\n```', [3.5, 10]),
    ("[6, 0]", [6, 0]),  # VIEScore also accepts an answer that is only the list
    ('**"score"**: [4,4] then again "score": [4, 4]', [4, 4]),
    ('｛"score"：［8，2］｝', [8, 2]),  # full-width punctuation
])
def test_vie_scores_read(text, scores):
    assert parse_vie_scores(text) == scores


@pytest.mark.parametrize("text, message", [
    ("The edit looks fine. Step 1: check. 7 out of 10.", "no \"score\""),
    ('{"score": [...], "reasoning": "..."}', "not a number"),
    ('{"score": [11, 5]}', "outside 0-10"),
    ('{"score": [5]}', "expected 2 scores"),
    ('{"score": [5, 6]} ... {"score": [6, 6]}', "conflicting"),
])
def test_vie_scores_refused(text, message):
    with pytest.raises(JudgeParseError, match=message):
        parse_vie_scores(text)


@pytest.mark.parametrize("text, keys, scores", [
    ('{"reasoning": "...", "consistency_score": 4}', ("consistency",), {"consistency": 4}),
    ('**Instruction Score**: 3\n"knowledge_score": 1', ("instruction", "knowledge"),
     {"instruction": 3, "knowledge": 1}),
    ('{"quality_score": 4.5,}', ("quality",), {"quality": 4.5}),  # decimals kept, not truncated
    ('quality_score：5', ("quality",), {"quality": 5}),
])
def test_kris_scores_read(text, keys, scores):
    assert parse_kris_scores(text, keys) == scores


@pytest.mark.parametrize("text, keys, message", [
    ("Step 1. Detect difference: 2 objects changed. Score 4/5.", ("instruction",), "no instruction_score"),
    ('"instruction_score": X', ("instruction",), "'X', not a number"),
    ('"quality_score": 0', ("quality",), "outside 1-5"),
    ('"instruction_score": 4, "knowledge_score": 2, instruction_score: 5', ("instruction", "knowledge"),
     "conflicting"),
    ('"instruction_score": 4', ("instruction", "knowledge"), "no knowledge_score"),
])
def test_kris_scores_refused(text, keys, message):
    with pytest.raises(JudgeParseError, match=message):
        parse_kris_scores(text, keys)


def test_unreadable_answers_are_retried_then_failed_never_scored():
    calls = []

    def chat(turns, attempt):
        calls.append((len(turns), attempt))
        return ['{"score": [5, 6]}' if "fix" in t[0]["text"] and attempt == 1 else "no json" for t in turns]

    results = ask(chat, [[{"text": "fix me"}], [{"text": "never"}]], lambda t: {"s": parse_vie_scores(t)}, 2)
    assert calls == [(2, 0), (2, 1), (1, 2)]  # only the unread items are asked again, at most 1 + 2 times
    assert results[0]["valid"] and results[0]["scores"] == {"s": [5, 6]} and results[0]["attempts"] == 2
    assert not results[1]["valid"] and results[1]["scores"] is None and results[1]["attempts"] == 3
    assert "no \"score\"" in results[1]["error"]


def test_prompts_are_the_packaged_texts_filled_like_the_references():
    assert all(load_prompt(n) and not load_prompt(n).startswith("#") for n in PROMPT_NAMES)
    sc = gedit_sc_turn("SRC", "EDIT", "make it red")
    assert [p.get("image") for p in sc[:2]] == ["SRC", "EDIT"]
    assert sc[2]["text"].startswith("You are a professional digital artist.")
    assert "Editing instruction: make it red" in sc[2]["text"] and "<instruction>" not in sc[2]["text"]
    dual = kris_turn("kris_dual", "SRC", "EDIT", instruct="add MnO2", explanation="bubbles")
    assert "**Editing Instruction**: add MnO2" in dual[0]["text"]
    assert "**Real-World Knowledge Explanation**：bubbles" in dual[0]["text"]
    assert '{\n  "instruction_score": X,' in dual[0]["text"]  # doubled braces became literal ones
    assert [p.get("text") or p["image"] for p in dual[1:]] == [
        "This is the original image:", "SRC", "This is the edited image:", "EDIT"]


def _g(task, lang, inter, scores, status="ok"):
    return {"id": f"{lang}/{task}/{id(scores)}", "group": task, "status": status,
            "meta": {"language": lang, "intersection": inter},
            "scores": None if scores is None else {"SC": scores[0], "PQ": scores[1],
                                                   "O": math.sqrt(scores[0] * scores[1])}}


def test_gedit_mean_of_task_means_per_language_and_subset():
    records = [_g("background_change", "en", True, (8, 6)), _g("background_change", "en", False, (4, 9)),
               _g("background_change", "en", True, None, "judge_failed"),
               _g("color_alter", "en", True, (10, 10)), _g("color_alter", "cn", True, (2, 2)),
               {**_g("text_change", "en", False, None, "source_error")}]
    s = gedit_summary(records)
    full = s["en"]["full"]
    # Per task: background (8+4)/2 = 6, (6+9)/2 = 7.5, (sqrt 48 + 6)/2; color 10, 10, 10. Then the plain mean
    # of the task means (the mean over samples would give SC 22/3).
    assert full["scores"]["SC"] == pytest.approx(8.0)
    assert full["scores"]["PQ"] == pytest.approx(8.75)
    assert full["scores"]["O"] == pytest.approx(((math.sqrt(48) + 6) / 2 + 10) / 2)
    assert full["per_task"]["background_change"] == pytest.approx(
        {"items": 3, "scored": 2, "SC": 6.0, "PQ": 7.5, "O": (math.sqrt(48) + 6) / 2})
    assert full["counts"] == {"judge_failed": 1, "ok": 3, "source_error": 1}
    assert "text_change" in full["missing_task_types"] and "color_alter" not in full["missing_task_types"]
    inter = s["en"]["intersection"]
    assert inter["scores"] == pytest.approx({"SC": 9.0, "PQ": 8.0, "O": (math.sqrt(48) + 10) / 2})
    assert s["cn"]["full"]["scores"] == pytest.approx({"SC": 2.0, "PQ": 2.0, "O": 2.0})


def _k(folder, scores, status="ok"):
    return {"id": f"{folder}/{id(scores)}", "group": folder, "status": status, "meta": {}, "scores": scores}


def test_kris_normalised_and_pooled_as_the_summary_script():
    records = [_k("humanities", {"VC": 5, "VQ": 4, "IF": 3, "KP": 1}),
               _k("humanities", {"VC": 4, "VQ": None, "IF": 2, "KP": 1}, "judge_failed"),
               _k("color_change", {"VC": 5, "VQ": 5, "IF": 5}),
               _k("temporal_prediction", None, "unsupported")]
    s = kris_summary(records)
    # (s - 1) * 25: VC 100, 75; VQ 75 (the failed one left out); IF 50, 25; KP 0, 0.
    assert s["groups"]["Social Science"] == pytest.approx(
        {"VC": 87.5, "VQ": 75.0, "IF": 37.5, "KP": 0.0, "AVG": 325 / 7})  # pooled, not (87.5+75+37.5+0)/4
    assert s["folders"]["humanities"]["scored"] == {"VC": 2, "VQ": 1, "IF": 2, "KP": 2}
    assert s["groups"]["Attribute Perception"] == pytest.approx({"VC": 100, "VQ": 100, "IF": 100, "AVG": 100})
    assert {t: v["AVG"] for t, v in s["knowledge_types"].items()} == pytest.approx(
        {"Factual Knowledge": 100.0, "Conceptual Knowledge": 325 / 7})
    assert s["overall"]["AVG"] == pytest.approx((325 + 300) / 10)
    assert s["counts"] == {"judge_failed": 1, "ok": 2, "unsupported": 1}
    assert s["folders"]["temporal_prediction"]["counts"] == {"unsupported": 1}
