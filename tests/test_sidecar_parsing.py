"""Sidecar pieces without models: judge/decomposer parsing, the retry rule, rewards, templates, the wire
format and the bind policy."""

import numpy as np
import pytest

from cogniedit_jax.sidecar.client import SidecarConfig, judge_rewards
from cogniedit_jax.sidecar.judge import score_with_retries
from cogniedit_jax.sidecar.parsing import (
    JudgeParseError,
    parse_decomposition,
    parse_judge_scores,
    reward_from_scores,
    validate_scores,
)
from cogniedit_jax.sidecar.prompts import fill, load_template
from cogniedit_jax.sidecar.protocol import (
    ProtocolError,
    decode_array,
    decode_image,
    encode_array,
    encode_image,
)
from cogniedit_jax.sidecar.rules import get_rule_judge, register_rule_judge
from cogniedit_jax.sidecar.server import check_bind, is_loopback

S4325 = {"alignment": 4.0, "coherence": 3.0, "style": 2.0, "consistency": 5.0}


@pytest.mark.parametrize("text", [
    ("Alignment Score (1-5): 4\nCoherence Score (1-5): 3\nStyle Score (1-5): 2\nConsistency Score (1-5): 5\n"
     "Reasons: the cat is blue."),
    "alignment score: 4 COHERENCE SCORE: 3 style score: 2 consistency score: 5",
    ("**Alignment Score (1-5):** 4\n**Coherence Score (1-5):** 3\n**Style Score (1-5):** 2\n"
     "**Consistency Score (1-5):** 5"),
    "### Alignment Score\n4/5\n### Coherence Score\n3 / 5\n### Style Score\n2 out of 5\n### Consistency Score\n5/5",
    ("Step 1: I look at the image. Step 2: compare.\nAlignment Score：４\nCoherence Score: 3\nStyle: 2\n"
     "Consistency = 5\nThe alignment score is 4 because the hat is red."),
    ("```\nAlignment Score (1-5): 4.0\nCoherence Score (1-5): 3.0\nStyle Score (1-5): 2.0\n"
     "Consistency Score (1-5): 5.0\n```"),
])
def test_judge_parser_accepts_usual_variations(text):
    assert parse_judge_scores(text) == S4325


def test_judge_parser_keeps_decimals():
    scores = parse_judge_scores("Alignment Score: 4.5 Coherence Score: 3.25 Style Score: 1 Consistency Score: 4.75")
    assert scores == {"alignment": 4.5, "coherence": 3.25, "style": 1.0, "consistency": 4.75}


@pytest.mark.parametrize("text, message", [
    ("Alignment Score: 4 Coherence Score: 3 Style Score: 2", "missing score(s): consistency"),
    ("Alignment Score (1-5): X Coherence Score (1-5): Y Style Score (1-5): Z Consistency Score (1-5): W",
     "placeholder letters were echoed"),
    # The template echoed first, real numbers after: still refused (the answer is confused).
    ("Alignment Score (1-5): X ... Alignment Score: 4 Coherence Score: 3 Style Score: 2 Consistency Score: 5",
     "placeholder letters were echoed for: alignment"),
    ("Alignment Score: 6 Coherence Score: 3 Style Score: 2 Consistency Score: 5", "alignment score 6.0 is outside"),
    ("Alignment Score: 0 Coherence Score: 3 Style Score: 2 Consistency Score: 5", "alignment score 0.0 is outside"),
    ("Alignment Score: 8/10 Coherence Score: 3 Style Score: 2 Consistency Score: 5", "is not out of 5"),
    ("Alignment Score: 4 Coherence Score: 3 Style Score: 2 Consistency Score: 5\nOn reflection, Alignment Score: 2",
     "conflicting scores: {'alignment': [2.0, 4.0]}"),
    ("Step 1: 4. Step 2: 3. Step 3: 5. Step 4: 2.", "missing score(s): alignment, coherence, style, consistency"),
    ("", "missing score(s)"),
])
def test_judge_parser_rejects(text, message):
    with pytest.raises(JudgeParseError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("{", r"\{")):
        parse_judge_scores(text)


def test_validate_scores_names_the_key():
    with pytest.raises(JudgeParseError, match="coherence score 'high' is not a finite number"):
        validate_scores({**S4325, "coherence": "high"})
    with pytest.raises(JudgeParseError, match="style score nan"):
        validate_scores({**S4325, "style": float("nan")})


def test_reward_is_alignment_plus_coherence_plus_consistency():
    assert reward_from_scores(S4325) == 12.0  # style (2) left out, as the paper's eq. 12
    assert reward_from_scores(S4325, "mean") == 4.0
    assert reward_from_scores(S4325, "unit") == pytest.approx(0.75)
    assert reward_from_scores(dict.fromkeys(S4325, 1.0), "unit") == 0.0
    with pytest.raises(ValueError, match="'max' is not one of"):
        reward_from_scores(S4325, "max")


def test_judge_rewards_mark_invalid_samples_with_nan():
    ok = {"valid": True, "scores": S4325}
    bad = {"valid": False, "scores": None}
    rewards, valid = judge_rewards([ok, bad, ok], "sum")
    assert valid.tolist() == [True, False, True]
    assert rewards[0] == rewards[2] == 12.0 and np.isnan(rewards[1])


GOOD = "Alignment Score: 4 Coherence Score: 3 Style Score: 2 Consistency Score: 5"


def test_unreadable_answers_are_retried_then_marked_invalid():
    calls = []
    scripts = {0: [GOOD, "garbage", "garbage"], 1: [GOOD, "still garbage"], 2: ["Alignment Score (1-5): X"]}

    def answer(indices, attempt):
        calls.append((list(indices), attempt))
        return scripts[attempt][:len(indices)]

    results = score_with_retries(answer, 3, retries=2)
    # Attempt 0 (greedy) asks for all, each retry (sampled) only for what is still unreadable.
    assert calls == [([0, 1, 2], 0), ([1, 2], 1), ([2], 2)]
    assert [r["valid"] for r in results] == [True, True, False]
    assert [r["attempts"] for r in results] == [1, 2, 3]
    assert results[0]["scores"] == S4325 and results[1]["scores"] == S4325
    assert results[2]["scores"] is None and "placeholder" in results[2]["error"]
    assert results[2]["text"] == "Alignment Score (1-5): X"


def test_no_retries_means_one_attempt():
    results = score_with_retries(lambda idx, attempt: ["nope"] * len(idx), 2, retries=0)
    assert [(r["valid"], r["attempts"]) for r in results] == [(False, 1), (False, 1)]


@pytest.mark.parametrize("text, expect", [
    (("<info>a red cube</info> <think>make it blue</think> <answer>Paint the cube blue.</answer> "
      "<object>the cube, center</object>"), ("a red cube", "make it blue", "Paint the cube blue.", "the cube, center")),
    # reordered, upper case, spaces in tags, a missing closing tag
    ("<OBJECT>the cube</object>\n< answer >Paint it blue.\n<think>t</think><info>i</info>",
     ("i", "t", "Paint it blue.", "the cube")),
])
def test_decomposition_parser_tolerates_order_case_and_missing_closers(text, expect):
    d = parse_decomposition(text, "make it blue")
    assert (d.info, d.think, d.answer, d.object) == expect
    assert d.instruction == expect[2] and not d.fallback and d.missing == ()


def test_decomposition_without_answer_falls_back_to_the_instruction():
    d = parse_decomposition("<info>a cube</info><think>hmm</think><answer>  </answer>", "make it blue")
    assert d.fallback and d.instruction == "make it blue"
    assert d.missing == ("answer", "object")
    assert parse_decomposition("free text only", "x").missing == ("info", "think", "answer", "object")


def test_templates():
    judge = load_template("judge")
    assert judge.startswith("You are presented with an edited image (the first image)")
    assert "Consistency Score (1-5): W" in judge and "#" not in judge.splitlines()[0]
    assert fill(judge, "judge", "add a hat").endswith("Caption: add a hat")
    assert "{instruction}" in load_template("decomposer")


def test_user_template_needs_its_placeholder(tmp_path):
    (tmp_path / "j.txt").write_text("# doc\nScore the edit.\n")
    with pytest.raises(ValueError, match=r"j.txt: the prompt must contain \{caption\} exactly once"):
        load_template("judge", tmp_path / "j.txt")


def test_wire_arrays_and_images_round_trip():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for fmt in ("raw", "png"):
        np.testing.assert_array_equal(decode_image(encode_image(img, fmt), 10**6), img)
    emb = rng.standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(decode_array(encode_array(emb)), emb)
    import ml_dtypes

    bf = emb.astype(ml_dtypes.bfloat16)
    assert decode_array(encode_array(bf)).dtype == bf.dtype


@pytest.mark.parametrize("fmt", ["raw", "png"])
def test_wire_refuses_images_over_the_pixel_limit(fmt):
    img = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ProtocolError, match=r"items\[0\].source: image 30x20 = 600 pixels is over the limit of 599"):
        decode_image(encode_image(img, fmt), 599, "items[0].source")


def test_wire_refuses_malformed_arrays():
    good = encode_array(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ProtocolError, match="12 bytes of data, shape \\[2, 2, 4\\] uint8 needs 16"):
        decode_image({**good, "shape": [2, 2, 4]}, 100)
    with pytest.raises(ProtocolError, match="not valid base64"):
        decode_array({**good, "data": "%%%"})
    with pytest.raises(ProtocolError, match="expected uint8 \\[H, W, 3\\], found float32"):
        decode_image(encode_array(np.zeros((1, 1, 3), np.float32)), 100)
    with pytest.raises(ProtocolError, match="not a readable base64 PNG"):
        decode_image({"png": "aGVsbG8="}, 100)


def test_bind_policy():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    check_bind("127.0.0.1", allow_remote=False, token=None)
    check_bind("0.0.0.0", allow_remote=True, token="t")
    with pytest.raises(SystemExit, match="not a loopback address.*--allow-remote and a token"):
        check_bind("0.0.0.0", allow_remote=False, token="t")
    with pytest.raises(SystemExit, match="--allow-remote but no token"):
        check_bind("0.0.0.0", allow_remote=True, token=None)


def test_rule_registry():
    def rule(edited, source, instruction):
        if instruction == "refused":
            raise JudgeParseError("no referent for 'refused'")
        return {**S4325, "alignment": 4.0 if instruction == "ok" else 9.0}

    register_rule_judge("parsing-test-rule", rule)
    with pytest.raises(ValueError, match="already registered"):
        register_rule_judge("parsing-test-rule", lambda *a: None)
    judge = get_rule_judge("parsing-test-rule")
    img = np.zeros((2, 2, 3), np.uint8)
    ok, bad, refused = judge.score([{"edited": img, "source": img, "instruction": i}
                                    for i in ("ok", "bad", "refused")])
    assert ok["valid"] and ok["scores"] == S4325 and judge.backend == "rule:parsing-test-rule"
    assert not bad["valid"] and "alignment score 9.0 is outside" in bad["error"]
    assert not refused["valid"] and "no referent" in refused["error"]  # a refusing rule marks only its sample
    with pytest.raises(KeyError, match="no rule judge registered as 'nope'"):
        get_rule_judge("nope")


def test_client_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown sidecar config key\(s\) \['judges'\]"):
        SidecarConfig.from_dict({"judges": "x"})
