"""The demo's editing world: flat shapes on a 3x3 grid, edit instructions about colour, position and quantity,
the exact target of each edit, a rule judge that reads images by pixel analysis, and a rule decomposer.

A scene is a tuple of 9 cells (row-major, top left first), each empty (None) or a `(shape, colour)` pair; it
renders to a 24x24 RGB image, one 8x8 tile per cell (small enough for a CPU to learn to edit in minutes).
Instructions come from a closed grammar, as text, and
`parse_instruction` reads them back, so the judge needs nothing but the images and the instruction text:

    make the square on the left purple       move the red circle to the bottom right
    add two blue circles at the top          remove one triangle
    make all circles yellow and remove the green square

An instruction may leave a choice ("add two circles at the top" with three free cells there); `outcomes`
lists every scene that carries it out, `target_scene` is the first (the rendered reference target), and the
judge scores an edited image against whichever outcome it is closest to.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np

from cogniedit_jax.sidecar.parsing import JudgeParseError, parse_decomposition

GRID = 3
CELL = 8
IMAGE_SIZE = GRID * CELL
SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (220, 50, 50), "green": (50, 170, 70), "blue": (50, 90, 220), "yellow": (230, 200, 40),
           "purple": (150, 70, 190)}
BACKGROUND = (240, 240, 240)
CELL_NAMES = ("top left", "top center", "top right", "middle left", "center", "middle right",
              "bottom left", "bottom center", "bottom right")
# Regions of several cells, with the phrase that places something in them.
REGIONS = {"left": (0, 3, 6), "right": (2, 5, 8), "top": (0, 1, 2), "bottom": (6, 7, 8)}
REGION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                  "bottom": "at the bottom"}
NUMBERS = {"one": 1, "two": 2, "three": 3}
ATTRIBUTES = ("colour", "position", "quantity")

Obj = tuple[str, str]  # (shape, colour)
Scene = tuple  # 9 cells, each None or an Obj


# ---------------------------------------------------------------------------------------------- rendering

def _shape_masks() -> dict[str, np.ndarray]:
    """Boolean CELL x CELL masks, tested at pixel centres: the drawing and the judge's templates."""
    v, u = np.mgrid[0:CELL, 0:CELL] + 0.5
    c = CELL / 2
    return {"square": (abs(u - c) <= 3) & (abs(v - c) <= 3),
            "circle": (u - c) ** 2 + (v - c) ** 2 <= 2.9 ** 2,
            "triangle": (v >= 1) & (v <= 7) & (abs(u - c) <= (v - 1) / 6 * 3.6)}


MASKS = _shape_masks()


def _tile(obj) -> np.ndarray:
    tile = np.broadcast_to(np.array(BACKGROUND, np.uint8), (CELL, CELL, 3)).copy()
    if obj is not None:
        tile[MASKS[obj[0]]] = COLOURS[obj[1]]
    return tile


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]."""
    check_scene(scene)
    tiles = [_tile(obj) for obj in scene]
    rows = [np.concatenate(tiles[r * GRID:(r + 1) * GRID], axis=1) for r in range(GRID)]
    return np.concatenate(rows, axis=0)


def check_scene(scene) -> None:
    if len(scene) != GRID * GRID:
        raise ValueError(f"a scene has {GRID * GRID} cells, found {len(scene)}")
    for i, obj in enumerate(scene):
        if obj is not None and (len(obj) != 2 or obj[0] not in SHAPES or obj[1] not in COLOURS):
            raise ValueError(f"scene cell {i} ({CELL_NAMES[i]}): {obj!r} is not (shape in {SHAPES}, "
                             f"colour in {tuple(COLOURS)})")


def describe_scene(scene: Scene) -> str:
    items = [f"a {obj[1]} {obj[0]} in the {CELL_NAMES[i]}" for i, obj in enumerate(scene) if obj is not None]
    return ", ".join(items) if items else "nothing"


# ---------------------------------------------------------------------------------------------- edits

@dataclasses.dataclass(frozen=True)
class Selector:
    """Which objects a phrase names: any of shape, colour and place (a region or a cell name) may be open."""

    shape: str | None = None
    colour: str | None = None
    place: str | None = None

    def cells(self) -> tuple[int, ...]:
        if self.place is None:
            return tuple(range(GRID * GRID))
        return REGIONS[self.place] if self.place in REGIONS else (CELL_NAMES.index(self.place),)

    def matches(self, scene: Scene) -> list[int]:
        return [i for i in self.cells() if scene[i] is not None
                and self.shape in (None, scene[i][0]) and self.colour in (None, scene[i][1])]

    def phrase(self, plural: bool = False) -> str:
        noun = (self.shape or "shape") + ("s" if plural else "")
        words = [self.colour, noun, _place_phrase(self.place)]
        return " ".join(w for w in words if w)


def _place_phrase(place: str | None) -> str | None:
    if place is None:
        return None
    return REGION_PHRASES[place] if place in REGIONS else f"in the {place}"


@dataclasses.dataclass(frozen=True)
class Edit:
    """One clause of an instruction.

    kind: "recolour" (what -> colour), "move" (the what -> cell `to`), "add" (`count` new objects of what's
    shape and colour in what's place), "remove" (what). count: "the" (exactly one object matches), "all",
    or a number word (that many of the matching objects, any of them).
    """

    kind: str
    what: Selector
    count: str = "the"
    colour: str | None = None
    to: str | None = None

    def text(self) -> str:
        plural = self.count not in ("the", "one")
        det = "a" if self.kind == "add" and self.count == "one" else self.count
        obj = f"{det} {self.what.phrase(plural)}"
        if self.kind == "recolour":
            return f"make {obj} {self.colour}"
        if self.kind == "move":
            return f"move {obj} to the {self.to}"
        return f"{self.kind} {obj}"

    def attributes(self) -> tuple[str, ...]:
        """The fine-grained attributes this clause tests (for per-attribute accuracy): a new colour or a
        colour to add is colour, a destination or a place to add in is position, adding, removing and
        every count but "the" is quantity."""
        found = {"colour"} if self.kind == "recolour" or self.kind == "add" else set()
        if self.kind == "move" or (self.kind == "add" and self.what.place is not None):
            found.add("position")
        if self.kind in ("add", "remove") or self.count != "the":
            found.add("quantity")
        return tuple(a for a in ATTRIBUTES if a in found)


def instruction_text(edits: tuple[Edit, ...]) -> str:
    return " and ".join(e.text() for e in edits)


def instruction_attributes(edits: tuple[Edit, ...]) -> tuple[str, ...]:
    found = {a for e in edits for a in e.attributes()}
    return tuple(a for a in ATTRIBUTES if a in found)


class EditError(ValueError):
    """An edit that cannot be carried out on a scene (no unique referent, no free cell, ...)."""


def _apply(scene: Scene, edit: Edit) -> list[Scene]:
    """Every scene that carries out one clause."""
    cells = list(scene)
    if edit.kind == "add":
        free = [i for i in edit.what.cells() if scene[i] is None]
        n = NUMBERS[edit.count]
        if len(free) < n:
            raise EditError(f"{edit.text()!r}: {len(free)} free cell(s), need {n}")
        out = []
        for chosen in itertools.combinations(free, n):
            new = list(cells)
            for i in chosen:
                new[i] = (edit.what.shape, edit.what.colour)
            out.append(tuple(new))
        return out
    found = edit.what.matches(scene)
    if edit.count == "the" and len(found) != 1:
        raise EditError(f"{edit.text()!r}: {len(found)} objects match, need exactly one")
    if edit.count == "all" and not found:
        raise EditError(f"{edit.text()!r}: nothing matches")
    if edit.count in NUMBERS and len(found) < NUMBERS[edit.count]:
        raise EditError(f"{edit.text()!r}: {len(found)} objects match, need {NUMBERS[edit.count]}")
    groups = (itertools.combinations(found, NUMBERS[edit.count]) if edit.count in NUMBERS else [found])
    out = []
    for group in groups:
        new = list(cells)
        for i in group:
            if edit.kind == "remove":
                new[i] = None
            elif edit.kind == "recolour":
                if scene[i][1] == edit.colour:
                    raise EditError(f"{edit.text()!r}: the {CELL_NAMES[i]} object is {edit.colour} already")
                new[i] = (scene[i][0], edit.colour)
            else:  # move
                dest = CELL_NAMES.index(edit.to)
                if scene[dest] is not None:
                    raise EditError(f"{edit.text()!r}: the {edit.to} is taken")
                new[i], new[dest] = None, scene[i]
        out.append(tuple(new))
    return out


def outcomes(scene: Scene, edits: tuple[Edit, ...]) -> list[Scene]:
    """Every scene that carries out the clauses in order (raises `EditError` where one cannot be)."""
    scenes = [tuple(scene)]
    for edit in edits:
        scenes = list(dict.fromkeys(s for prev in scenes for s in _apply(prev, edit)))
    return scenes


def target_scene(scene: Scene, edits: tuple[Edit, ...]) -> Scene:
    """The reference outcome: the first of `outcomes` (free cells and objects taken in reading order)."""
    return outcomes(scene, edits)[0]


# ---------------------------------------------------------------------------------------------- grammar

class InstructionError(ValueError):
    """Text outside the shapes world's grammar."""


_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_CELL = "|".join(sorted(CELL_NAMES, key=len, reverse=True))
_PLACE = (rf"(?:on the (?P<side>left|right)|at the (?P<edge>top|bottom)|in the (?P<cell>{_CELL}))")
_OBJECT = (rf"(?P<count>the|all|a|one|two|three) (?:(?P<what_colour>{_COLOUR}) )?"
           rf"(?P<shape>{_SHAPE}|shape)s?(?: {_PLACE})?")
_CLAUSE = re.compile(rf"(?P<verb>make|move|add|remove) {_OBJECT}"
                     rf"(?: (?P<new_colour>{_COLOUR})| to the (?P<to>{_CELL}))?")


def _parse_clause(text: str) -> Edit:
    m = _CLAUSE.fullmatch(text)
    if m is None:
        raise InstructionError(f"{text!r} is not a clause of the shapes grammar "
                               "(make/move/add/remove + object [+ colour | to the CELL])")
    verb, count = m["verb"], m["count"]
    count = "one" if count == "a" else count
    place = m["side"] or m["edge"] or m["cell"]
    what = Selector(None if m["shape"] == "shape" else m["shape"], m["what_colour"], place)
    kind = {"make": "recolour"}.get(verb, verb)
    needs = {"recolour": "new_colour", "move": "to"}.get(kind)
    extra = [g for g in ("new_colour", "to") if m[g] and g != needs]
    if (needs and not m[needs]) or extra:
        raise InstructionError(f"{text!r}: {verb!r} takes {needs or 'nothing'} after the object")
    if kind == "add" and (count in ("the", "all") or what.shape is None or what.colour is None):
        raise InstructionError(f"{text!r}: add takes a number, a colour and a shape")
    if kind == "move" and count != "the":
        raise InstructionError(f"{text!r}: move takes one object ('the ...')")
    return Edit(kind, what, count, m["new_colour"], m["to"])


def instruction_words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped (the grammar's and the demo editor's tokenization)."""
    return text.lower().replace(".", " ").replace(",", " ").split()


def parse_instruction(text: str) -> tuple[Edit, ...]:
    """Instruction text -> its clauses; `instruction_text` of the result gives the text back (normalised)."""
    words = " ".join(instruction_words(text))
    if not words:
        raise InstructionError("empty instruction")
    return tuple(_parse_clause(clause) for clause in words.split(" and "))


def vocabulary() -> tuple[str, ...]:
    """Every word the grammar can produce, in a fixed order (the demo editor's text vocabulary)."""
    words = ["make", "move", "add", "remove", "the", "all", "a", "one", "two", "three", "and", "to", "on",
             "at", "in", "shape", "shapes", *SHAPES, *(s + "s" for s in SHAPES), *COLOURS]
    words += [w for name in CELL_NAMES + tuple(REGIONS) for w in name.split()]
    return tuple(dict.fromkeys(words))


# ---------------------------------------------------------------------------------------------- sampling

@dataclasses.dataclass(frozen=True)
class Example:
    source: Scene
    edits: tuple[Edit, ...]
    target: Scene

    @property
    def instruction(self) -> str:
        return instruction_text(self.edits)


def random_scene(rng: np.random.Generator, min_objects: int = 2, max_objects: int = 5) -> Scene:
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = [None] * (GRID * GRID)
    for i in rng.choice(GRID * GRID, n, replace=False):
        cells[int(i)] = (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))))
    return tuple(cells)


def _unique_selectors(scene: Scene, i: int) -> list[Selector]:
    """Ways to name the object in cell i so that it is the only match."""
    shape, colour = scene[i]
    places = [None, CELL_NAMES[i]] + [r for r, cells in REGIONS.items() if i in cells]
    out = [Selector(s, c, p) for s in (shape, None) for c in (None, colour) for p in places
           if (s or c) and len(Selector(s, c, p).matches(scene)) == 1]
    return out


def _random_clause(rng: np.random.Generator, scene: Scene) -> Edit | None:
    kind = str(rng.choice(["recolour", "move", "add", "remove"], p=[0.3, 0.2, 0.25, 0.25]))
    occupied = [i for i, o in enumerate(scene) if o is not None]
    free = [i for i, o in enumerate(scene) if o is None]
    colours = list(COLOURS)
    if kind == "add":
        place = rng.choice([None, *REGIONS, *CELL_NAMES], p=[0.2] + [0.15] * 4 + [0.2 / 9] * 9)
        place = None if place is None else str(place)
        what = Selector(str(rng.choice(SHAPES)), str(rng.choice(colours)), place)
        room = sum(scene[c] is None for c in what.cells())
        count = "one" if place in CELL_NAMES else str(rng.choice(["one", "two", "three"], p=[0.4, 0.4, 0.2]))
        return Edit("add", what, count) if room >= NUMBERS[count] else None
    if not occupied:
        return None
    if kind in ("recolour", "remove") and rng.random() < 0.35:
        # A quantity phrase: all of a shape or colour, or a number of them.
        i = int(rng.choice(occupied))
        what = Selector(scene[i][0], None) if rng.random() < 0.6 else Selector(None, scene[i][1])
        n = len(what.matches(scene))
        options = ["all"] + ([w for w, k in NUMBERS.items() if k < n] if kind == "remove" else [])
        count = str(rng.choice(options))
        colour = str(rng.choice([c for c in colours if c != scene[i][1]])) if kind == "recolour" else None
        if kind == "recolour" and any(scene[j][1] == colour for j in what.matches(scene)):
            return None
        return Edit(kind, what, count, colour)
    i = int(rng.choice(occupied))
    selectors = _unique_selectors(scene, i)
    if not selectors:
        return None
    what = selectors[int(rng.integers(len(selectors)))]
    if kind == "recolour":
        return Edit(kind, what, colour=str(rng.choice([c for c in colours if c != scene[i][1]])))
    if kind == "move":
        return Edit(kind, what, to=CELL_NAMES[int(rng.choice(free))]) if free else None
    return Edit(kind, what)


def random_example(rng: np.random.Generator, combine_p: float = 0.2) -> Example:
    """A scene and an instruction it can carry out: one clause, or two with probability combine_p."""
    while True:
        scene = random_scene(rng)
        edits = []
        for _ in range(2 if rng.random() < combine_p else 1):
            edit = _random_clause(rng, target_scene(scene, tuple(edits)))
            if edit is None:
                break
            edits.append(edit)
        else:
            try:
                options = outcomes(scene, tuple(edits))
            except EditError:
                continue  # a second clause that only some outcomes of the first allow
            if scene not in options:  # a second clause that undoes the first
                return Example(scene, tuple(edits), options[0])


def make_examples(seed: int, n: int, combine_p: float = 0.2) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [random_example(rng, combine_p) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- judge

def perceive(image: np.ndarray) -> tuple[Scene, float]:
    """Read a scene off an image -> (scene, dirt): per cell, the foreground (pixels far from the background)
    decides presence, its median colour the nearest palette colour, its overlap (IoU) with the shape templates
    the shape. `dirt` is the fraction of pixels that differ (by more than 64 levels) from a rendering of the
    scene read: 0 for a clean rendering, more for smudges, blur and stray paint."""
    image = np.asarray(image)
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"image of shape {image.shape}: expected ({IMAGE_SIZE}, {IMAGE_SIZE}, 3)")
    img = image.astype(np.float32)
    palette = np.array(list(COLOURS.values()), np.float32)
    cells = []
    for r, c in itertools.product(range(GRID), range(GRID)):
        tile = img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
        fg = np.linalg.norm(tile - np.array(BACKGROUND, np.float32), axis=-1) > 80
        if fg.sum() < 10:
            cells.append(None)
            continue
        colour = list(COLOURS)[int(np.argmin(np.linalg.norm(palette - np.median(tile[fg], 0), axis=-1)))]
        iou = {s: (fg & m).sum() / (fg | m).sum() for s, m in MASKS.items()}
        cells.append((max(iou, key=iou.get), colour))
    scene = tuple(cells)
    dirt = float((np.abs(img - render(scene)).max(-1) > 64).mean())
    return scene, dirt


def _cell_score(edited, want) -> float:
    if want is None:
        return float(edited is None)
    if edited is None:
        return 0.0
    return {2: 1.0, 1: 0.25, 0: 0.0}[(edited[0] == want[0]) + (edited[1] == want[1])]


def score_edit(edited: np.ndarray, source: np.ndarray, instruction: str) -> dict:
    """The judge's scores and what they rest on.

    alignment: 1 + 4 x the mean over the cells the instruction changes of how well the edited cell matches
    (1 exact, 0.25 shape or colour right, 0 otherwise; a cell that should be emptied counts half);
    consistency: 5 - 1.5 per cell the instruction leaves alone that changed (at least 1);
    coherence (and style): 5 - 40 x dirt (see `perceive`): 10 % stray pixels or more is 1.
    Scored against the outcome the edit is closest to. Raises `JudgeParseError` for an instruction outside
    the grammar or one the source scene cannot carry out (no sample should be scored on it).
    """
    src, _ = perceive(source)
    got, dirt = perceive(edited)
    try:
        edits = parse_instruction(instruction)
        options = outcomes(src, edits)
    except (InstructionError, EditError) as e:
        raise JudgeParseError(f"shapes judge: {e}") from e
    best = None
    for want in options:
        changed = [i for i in range(GRID * GRID) if want[i] != src[i]]
        weights = np.array([1.0 if want[i] is not None else 0.5 for i in changed])
        hits = np.array([_cell_score(got[i], want[i]) for i in changed])
        alignment = 1 + 4 * float((weights * hits).sum() / weights.sum())
        stray = sum(got[i] != src[i] for i in range(GRID * GRID) if i not in changed)
        consistency = max(1.0, 5 - 1.5 * stray)
        if best is None or alignment + consistency > best[0] + best[1]:
            best = (alignment, consistency, want)
    coherence = max(1.0, 5 - 40 * dirt)
    alignment, consistency, want = best
    return {"alignment": alignment, "coherence": coherence, "style": coherence, "consistency": consistency,
            "exact": got == want, "attributes": instruction_attributes(edits)}


def shapes_judge(edited, source, instruction: str) -> dict:
    """The rule judge (`--rule-judge cogniedit_jax.data.shapes:shapes`): the four 1-5 scores."""
    scores = score_edit(edited, source, instruction)
    return {k: scores[k] for k in ("alignment", "coherence", "style", "consistency")}


# ---------------------------------------------------------------------------------------------- decomposer

def _atomic_clauses(before: Scene, after: Scene, edits: tuple[Edit, ...]) -> list[str]:
    """The reference outcome as explicit clauses, each naming its object by cell: removals first (they free
    cells), then moves (a moved object keeps its shape), then additions and new colours."""
    moves, scene = {}, before
    for edit in edits:
        if edit.kind == "move":
            (src,) = edit.what.matches(scene)
            moves[src] = CELL_NAMES.index(edit.to)
        scene = _apply(scene, edit)[0]
    moves = {s: d for s, d in moves.items()
             if before[s] is not None and after[d] is not None and after[d][0] == before[s][0]}
    removals, moved, rest = [], [], []
    for s, d in moves.items():
        moved.append(Edit("move", Selector(before[s][0], None, CELL_NAMES[s]), to=CELL_NAMES[d]))
        if after[d][1] != before[s][1]:
            moved.append(Edit("recolour", Selector(after[d][0], None, CELL_NAMES[d]), colour=after[d][1]))
    for i, (b, a) in enumerate(zip(before, after)):
        source, dest = i in moves, i in moves.values()
        if b is not None and not source and (dest or a is None or a[0] != b[0]):
            removals.append(Edit("remove", Selector(b[0], None, CELL_NAMES[i])))
        if dest or a is None:
            continue
        if b is None or source or a[0] != b[0]:
            rest.append(Edit("add", Selector(a[0], a[1], CELL_NAMES[i]), "one"))
        elif a[1] != b[1]:
            rest.append(Edit("recolour", Selector(b[0], None, CELL_NAMES[i]), colour=a[1]))
    return [e.text() for e in removals + moved + rest]


def decompose(image: np.ndarray, instruction: str) -> str:
    """The rule decomposer's answer in the MLLM's four-part format: <info> the scene, <think> what the
    instruction changes, <answer> the same edit as explicit clauses naming cells (in the editor's grammar),
    <object> the objects involved. An instruction the scene cannot carry out is kept as the answer."""
    return decompose_scene(perceive(image)[0], instruction)


def decompose_scene(scene: Scene, instruction: str) -> str:
    """`decompose` of the scene itself (no pixel reading)."""
    info = f"The image shows {describe_scene(scene)} on a light grey background, in a 3x3 grid."
    try:
        edits = parse_instruction(instruction)
        target = target_scene(scene, edits)
    except (InstructionError, EditError) as e:
        return (f"<info>{info}</info><think>The instruction cannot be made explicit: {e}.</think>"
                f"<answer>{instruction}</answer><object>none</object>")
    changed = [i for i in range(GRID * GRID) if scene[i] != target[i]]
    think = (f"{len(changed)} cell(s) change: " + "; ".join(
        f"the {CELL_NAMES[i]} goes from {_name(scene[i])} to {_name(target[i])}" for i in changed)
        + ". Everything else stays as it is.")
    objects = ", ".join(f"{_name(scene[i] or target[i])} ({CELL_NAMES[i]})" for i in changed)
    answer = " and ".join(_atomic_clauses(scene, target, edits))
    return f"<info>{info}</info><think>{think}</think><answer>{answer}</answer><object>{objects}</object>"


def _name(obj) -> str:
    return "empty" if obj is None else f"a {obj[1]} {obj[0]}"


class RuleDecomposer:
    """`decompose` behind the VL decomposer's interface (items `{"image", "instruction"}` -> parsed parts)."""

    def decompose(self, items: list[dict]) -> list[dict]:
        texts = [decompose(it["image"], it["instruction"]) for it in items]
        return [{**parse_decomposition(t, it["instruction"]).to_json(), "text": t}
                for t, it in zip(texts, items)]


def _register() -> None:
    from cogniedit_jax.sidecar.rules import register_rule_judge

    register_rule_judge("shapes", shapes_judge)


_register()
