"""Manifest format: round trip, validation messages naming file:line, bad lines skipped, nothing else lost."""

import json

import pytest

from cogniedit_jax.data.errors import DataError
from cogniedit_jax.data.manifest import Enhanced, ManifestItem, read_manifest, write_manifest

GOOD = {"id": "a", "source": "a.png", "instruction": "Make the sky red"}


def _write_lines(path, lines):
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


def test_round_trip_keeps_every_field(tmp_path):
    items = [
        ManifestItem(id="x1", source=str(tmp_path / "s.png"), instruction="Add a hat",
                     target=str(tmp_path / "t.png"),
                     enhanced=Enhanced(info="a man", think="hat on head", answer="Add a red hat to the man",
                                       object="the man's head"),
                     meta={"dataset": "mine"}),
        ManifestItem(id="x2", source=str(tmp_path / "s2.png"), instruction="Färbe den Himmel rot 🌅"),
    ]
    path = tmp_path / "m.jsonl"
    assert write_manifest(path, items) == 2
    back, skips = read_manifest(path)
    assert back == items and skips.total == 0
    assert "🌅" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = _write_lines(tmp_path / "sub" / "m.jsonl", [json.dumps({**GOOD, "target": "t/b.png"})])
    (item,), _ = read_manifest(path)
    assert item.source == str(tmp_path / "sub" / "a.png")
    assert item.target == str(tmp_path / "sub" / "t" / "b.png")


BAD_LINES = [
    ('{"id": "b", "source": "b.png", "instruction": ', "bad_line", "malformed JSON"),
    ('["not", "an", "object"]', "bad_line", "expected a JSON object, found list"),
    ('{"id": "b", "instruction": "x"}', "bad_field", "missing required fields ['source']"),
    ('{"id": "b", "source": "b.png", "instruction": "   "}', "empty_instruction",
     "field 'instruction' is empty"),
    ('{"id": "b", "source": "b.png", "instruction": 3}', "bad_field", "must be a string, found int"),
    ('{"id": "b", "source": "b.png", "instruction": "x", "colour": 1}', "bad_field",
     "unknown fields ['colour']"),
    ('{"id": "b", "source": "b.png", "instruction": "a \\ud800 b"}', "bad_text", "not valid UTF-8 text"),
    ('{"id": "b", "source": "b.png", "instruction": "x", "enhanced": {"info": "i", "answer": "a"}}',
     "bad_field",
     "field 'enhanced' must have exactly ['info', 'think', 'answer', 'object'], found ['answer', 'info']"),
    ('{"id": "b", "source": "", "instruction": "x"}', "bad_field", "field 'source' must be a non-empty path"),
    (b'{"id": "b", "source": "b.png", "instruction": "caf\xe9"}', "bad_text",
     "line is not valid UTF-8 (byte 0xe9 at column 51)"),
    ('{"id": "a", "source": "b.png", "instruction": "x"}', "duplicate_id", "id 'a' already used at"),
]


@pytest.mark.parametrize("line,kind,message", BAD_LINES,
                         ids=[k + str(i) for i, (_, k, _) in enumerate(BAD_LINES)])
def test_bad_line_is_named_counted_and_skipped(tmp_path, line, kind, message):
    good2 = {**GOOD, "id": "c"}
    path = _write_lines(tmp_path / "m.jsonl", [json.dumps(GOOD), "", line, json.dumps(good2)])
    items, skips = read_manifest(path)
    assert [it.id for it in items] == ["a", "c"]  # nothing else lost
    assert dict(skips.counts) == {kind: 1}
    assert skips.messages[0].startswith(f"{path}:3: ")
    assert message in skips.messages[0]
    with pytest.raises(DataError, match=f"{path}:3: ") as e:
        read_manifest(path, strict=True)
    assert e.value.kind == kind
