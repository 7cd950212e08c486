"""The shapes world: rendering, grammar, targets, the rule judge (per attribute) and the rule decomposer."""

import numpy as np
import pytest

from cogniedit_jax.data import shapes as S
from cogniedit_jax.sidecar.parsing import JudgeParseError, parse_decomposition
from cogniedit_jax.sidecar.rules import get_rule_judge

# top left: red square, middle left: blue triangle, center: green circle, bottom right: yellow triangle
SCENE = (("square", "red"), None, None, ("triangle", "blue"), ("circle", "green"), None,
         None, None, ("triangle", "yellow"))


def cells(**objs):
    """A scene from cell names: cells(top_left=("square", "red"), ...)."""
    out = [None] * 9
    for name, obj in objs.items():
        out[S.CELL_NAMES.index(name.replace("_", " "))] = obj
    return tuple(out)


@pytest.fixture(scope="module")
def examples():
    return S.make_examples(0, 400)


def test_render_paints_each_cell_and_reads_back():
    img = S.render(SCENE)
    c = S.CELL
    assert img.shape == (3 * c, 3 * c, 3) and img.dtype == np.uint8
    assert (img[c:2 * c, c:2 * c][S.MASKS["circle"]] == S.COLOURS["green"]).all()
    assert (img[c:2 * c, c:2 * c][~S.MASKS["circle"]] == S.BACKGROUND).all()
    assert (img[0:c, c:3 * c] == S.BACKGROUND).all()
    assert S.perceive(img) == (SCENE, 0.0)


def test_render_refuses_bad_scenes():
    with pytest.raises(ValueError, match="9 cells, found 2"):
        S.render((None, None))
    with pytest.raises(ValueError, match=r"cell 4 \(center\).*'hexagon'"):
        S.render(SCENE[:4] + (("hexagon", "red"),) + SCENE[5:])


def test_instructions_round_trip_and_targets_are_consistent(examples):
    kinds = {e.edits[0].kind for e in examples}
    assert kinds == {"recolour", "move", "add", "remove"} and any(len(e.edits) == 2 for e in examples)
    for e in examples:
        assert S.instruction_text(S.parse_instruction(e.instruction)) == e.instruction
        options = S.outcomes(e.source, e.edits)
        assert e.target == options[0] and e.source not in options
        assert S.perceive(S.render(e.target))[0] == e.target


def test_named_edits_give_the_expected_targets():
    assert S.target_scene(SCENE, S.parse_instruction("make the square on the left purple")) == \
        (("square", "purple"),) + SCENE[1:]
    assert S.target_scene(SCENE, S.parse_instruction("move the green circle to the top right")) == \
        SCENE[:2] + (("circle", "green"), SCENE[3], None) + SCENE[5:]
    # The top row has exactly two free cells: one outcome.
    added = S.outcomes(SCENE, S.parse_instruction("add two blue circles at the top"))
    assert added == [(SCENE[0], ("circle", "blue"), ("circle", "blue")) + SCENE[3:]]
    # Either triangle may go.
    removed = S.outcomes(SCENE, S.parse_instruction("Remove one triangle."))
    assert set(removed) == {SCENE[:3] + (None,) + SCENE[4:], SCENE[:8] + (None,)}
    assert S.target_scene(SCENE, S.parse_instruction("make all triangles red and remove the circle")) == \
        (SCENE[0], None, None, ("triangle", "red"), None, None, None, None, ("triangle", "red"))


@pytest.mark.parametrize("text,match", [
    ("paint the square red", "not a clause"),
    ("make the square", "takes new_colour"),
    ("add the blue circle", "add takes a number"),
    ("move all squares to the center", "move takes one object"),
])
def test_grammar_refusals(text, match):
    with pytest.raises(S.InstructionError, match=match):
        S.parse_instruction(text)


@pytest.mark.parametrize("text,match", [
    ("make the triangle red", "2 objects match, need exactly one"),
    ("move the square to the center", "the center is taken"),
    ("add three red squares on the left", "1 free cell"),
    ("make the green circle green", "green already"),
])
def test_edits_the_scene_cannot_carry_out(text, match):
    with pytest.raises(S.EditError, match=match):
        S.outcomes(SCENE, S.parse_instruction(text))


def scores(edited_scene, instruction, source=SCENE):
    return S.score_edit(S.render(edited_scene), S.render(source), instruction)


def test_judge_gives_the_maximum_on_exact_targets(examples):
    for e in examples[:150]:
        s = S.score_edit(S.render(e.target), S.render(e.source), e.instruction)
        assert (s["alignment"], s["coherence"], s["style"], s["consistency"]) == (5, 5, 5, 5) and s["exact"]
    # Any outcome of an open instruction is exact: the other triangle removed.
    assert scores(SCENE[:8] + (None,), "remove one triangle")["alignment"] == 5


def test_judge_wrong_colour():
    s = scores((("square", "blue"),) + SCENE[1:], "make the square on the left purple")
    assert s["alignment"] == 2 and s["consistency"] == 5 and s["coherence"] == 5 and not s["exact"]
    # One of two objects right: half way.
    s = scores((SCENE[0], None, None, ("triangle", "red"), SCENE[4], None, None, None, ("triangle", "green")),
               "make all triangles red")
    assert s["alignment"] == pytest.approx(1 + 4 * (1 + 0.25) / 2)
    assert s["attributes"] == ("colour", "quantity")


def test_judge_wrong_position():
    # Moved to the top center instead of the top right.
    s = scores(SCENE[:1] + (("circle", "green"), None, SCENE[3], None) + SCENE[5:],
               "move the green circle to the top right")
    assert s["alignment"] == pytest.approx(1 + 4 * 0.5 / 1.5) and s["consistency"] == 3.5
    assert s["attributes"] == ("position",)


def test_judge_wrong_count():
    one_added = (SCENE[0], ("circle", "blue")) + SCENE[2:]
    s = scores(one_added, "add two blue circles at the top")
    assert s["alignment"] == 3 and s["consistency"] == 5
    both_removed = SCENE[:3] + (None,) + SCENE[4:8] + (None,)
    s = scores(both_removed, "remove one triangle")
    assert s["alignment"] == 5 and s["consistency"] == 3.5 and not s["exact"]
    assert s["attributes"] == ("quantity",)


def test_judge_unedited_source_is_low_on_alignment_only(examples):
    got = [S.score_edit(S.render(e.source), S.render(e.source), e.instruction) for e in examples[:150]]
    assert np.mean([s["alignment"] for s in got]) < 1.5
    assert all(s["coherence"] == 5 and s["consistency"] == 5 for s in got)


def test_judge_coherence_falls_with_stray_pixels():
    img = S.render(SCENE)
    smudged = img.copy()
    smudged[16:18, 0:3] = (120, 120, 120)  # 6 grey pixels in an empty cell: too few to read as a shape
    s = S.score_edit(smudged, img, "remove the circle")
    assert s["coherence"] == pytest.approx(5 - 40 * 6 / S.IMAGE_SIZE ** 2) and s["consistency"] == 5
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 60, img.shape), 0, 255).astype(np.uint8)
    assert S.score_edit(noisy, img, "remove the circle")["coherence"] == 1


def test_rule_judge_through_the_sidecar_interface():
    judge = get_rule_judge("cogniedit_jax.data.shapes:shapes")
    src = S.render(SCENE)
    (good,) = judge.score([{"edited": S.render(SCENE[:4] + (None,) + SCENE[5:]), "source": src,
                            "instruction": "remove the circle"}])
    assert good["valid"] and good["scores"] == {"alignment": 5.0, "coherence": 5.0, "style": 5.0,
                                                "consistency": 5.0}
    # No sample is scored on an instruction without a referent (two triangles) or outside the grammar.
    with pytest.raises(JudgeParseError, match="need exactly one"):
        S.shapes_judge(src, src, "make the triangle red")
    with pytest.raises(JudgeParseError, match="not a clause"):
        S.shapes_judge(src, src, "make it pop")


def test_decomposer_output_parses_and_its_answer_is_the_same_edit(examples):
    for e in examples:
        text = S.decompose(S.render(e.source), e.instruction)
        d = parse_decomposition(text, e.instruction)
        assert not d.missing and not d.fallback
        assert S.outcomes(e.source, S.parse_instruction(d.answer)) == [e.target]
    out = S.RuleDecomposer().decompose([{"image": S.render(SCENE), "instruction": "remove one triangle"}])
    assert out[0]["answer"] == "remove the triangle in the middle left"
    assert "a blue triangle in the middle left" in out[0]["info"] and out[0]["object"]
    # An instruction the scene cannot carry out is passed through, still in four parts.
    d = parse_decomposition(S.decompose(S.render(SCENE), "make the triangle red"), "make the triangle red")
    assert d.answer == "make the triangle red" and not d.missing


def test_vocabulary_covers_every_instruction(examples):
    vocab = set(S.vocabulary())
    for e in examples:
        text = parse_decomposition(S.decompose_scene(e.source, e.instruction), e.instruction).answer
        assert set(S.instruction_words(e.instruction + " " + text)) <= vocab
