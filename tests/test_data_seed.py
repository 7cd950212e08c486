"""SEED-Data-Edit part 2 in its published layout and the plain-folder reader, through readers and CLI."""

import json

import pytest

from cogniedit_jax.data import build_manifest
from cogniedit_jax.data.folder import read_folder
from cogniedit_jax.data.manifest import read_manifest
from cogniedit_jax.data.seed_edit import read_seed_edit
from tests.test_data_helpers import save_rgb


def _seed_fixture(tmp_path):
    """AILab-CVC/SEED-Data-Edit-Part2-3 as downloaded (real_editing/images.tar.gz unpacked in place), with
    10 good pairs over two split files and one bad line of each kind."""
    root = tmp_path / "SEED-Data-Edit-Part2-3"
    ann = root / "real_editing" / "annotations"
    images = root / "real_editing" / "images"
    ann.mkdir(parents=True)
    expected = {}
    lines = {"split_0001.jsonl": [], "split_0002.jsonl": []}
    for k in range(10):
        split = "split_0001.jsonl" if k < 6 else "split_0002.jsonl"
        src, tgt = f"psbattle/{k:03d}_src.jpg", f"psbattle/{k:03d}_tgt.jpg"
        save_rgb(images / src, 24, 32, seed=k)
        save_rgb(images / tgt, 24, 32, seed=100 + k)
        row = {"source_image": src, "target_image": tgt, "instruction": f"edit {k} "}
        lines[split].append(json.dumps(row))
        item_id = f"seed2:{split[:-6]}:{len(lines[split])}"
        expected[item_id] = (str(images / src), str(images / tgt), f"edit {k}")
    save_rgb(images / "psbattle/lonely_src.jpg", 24, 32)
    bad = [
        ('{"source_image": "a.jpg", "target_image": ', "bad_line", "split_0001.jsonl:7: malformed JSON"),
        ('{"source_image": "a.jpg", "instruction": "x"}', "bad_field",
         "split_0001.jsonl:8: missing fields ['target_image']; found ['instruction', 'source_image']"),
        ('{"source_image": "a.jpg", "target_image": "b.jpg", "instruction": ""}', "empty_instruction",
         "split_0001.jsonl:9: field 'instruction' is empty"),
        ('{"source_image": "psbattle/lonely_src.jpg", "target_image": "psbattle/gone.jpg", '
         '"instruction": "x"}',
         "missing", "psbattle/gone.jpg: no such file"),
    ]
    lines["split_0001.jsonl"] += [b[0] for b in bad]
    for name, ls in lines.items():
        (ann / name).write_text("\n".join(ls) + "\n")
    return root, expected, bad


def test_reads_the_published_layout_and_reports_each_bad_line(tmp_path):
    root, expected, bad = _seed_fixture(tmp_path)
    items, skips = read_seed_edit(root)
    assert {it.id: (it.source, it.target, it.instruction) for it in items} == expected
    assert dict(skips.counts) == {kind: 1 for _, kind, _ in bad}
    for _, _, message in bad:
        assert sum(message in m for m in skips.messages) == 1, message
    # the real_editing folder itself is accepted as root too
    assert len(read_seed_edit(root / "real_editing")[0]) == 10


def test_sampling_is_seeded_and_skips_pairs_with_missing_images(tmp_path):
    root, expected, _ = _seed_fixture(tmp_path)
    a = [it.id for it in read_seed_edit(root, n=4, seed=0)[0]]
    assert a == [it.id for it in read_seed_edit(root, n=4, seed=0)[0]]
    assert len(a) == 4 and set(a) <= set(expected)
    assert a != [it.id for it in read_seed_edit(root, n=4, seed=1)[0]]
    # asking for more than exists: every good pair, and the one with a missing target is never among them
    assert sorted(it.id for it in read_seed_edit(root, n=50, seed=3)[0]) == sorted(expected)


def test_cli_writes_the_manifest(tmp_path, capsys):
    root, expected, _ = _seed_fixture(tmp_path)
    out = tmp_path / "seed.jsonl"
    assert build_manifest.main(["--source", "seed", "--root", str(root), "--n", "5", "--seed", "7",
                                "--out", str(out)]) == 0
    items, skips = read_manifest(out)
    assert skips.total == 0
    assert items == read_seed_edit(root, n=5, seed=7)[0]
    captured = capsys.readouterr()
    assert "wrote 5 items" in captured.out
    assert "split_0001.jsonl:7: malformed JSON" in captured.err  # the skip report names file and line


def test_cli_refuses_missing_arguments_and_missing_data(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_manifest.main(["--source", "coco", "--out", str(tmp_path / "x.jsonl")])
    out = str(tmp_path / "x.jsonl")
    assert build_manifest.main(["--source", "seed", "--root", str(tmp_path), "--out", out]) == 2
    assert "no real_editing/annotations folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert build_manifest.main(["--source", "folder", "--root", str(tmp_path / "empty"),
                                "--out", str(tmp_path / "x.jsonl")]) == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_folder_of_pairs(tmp_path):
    d = tmp_path / "pairs"
    save_rgb(d / "cat.png", 20, 30)
    save_rgb(d / "cat_target.png", 20, 30, seed=1)
    (d / "cat.txt").write_text("Make the cat purple\n")
    save_rgb(d / "sub" / "dog.jpg", 20, 30)
    (d / "sub" / "dog.txt").write_text("Remove the dog")
    save_rgb(d / "latin1.png", 20, 30)
    (d / "latin1.txt").write_bytes("Entferne den Bär".encode("latin-1"))
    save_rgb(d / "blank.png", 20, 30)
    (d / "blank.txt").write_text("  \n")
    (d / "orphan.txt").write_text("no image here")
    items, skips = read_folder(d)
    assert [(it.id, it.instruction, it.target is not None) for it in items] == [
        ("cat", "Make the cat purple", True), ("sub/dog", "Remove the dog", False)]
    assert dict(skips.counts) == {"bad_text": 1, "empty_instruction": 1, "missing": 1}
    text = "\n".join(skips.messages)
    assert f"{d / 'latin1.txt'}: instruction is not valid UTF-8" in text
    assert f"{d / 'blank.txt'}: field 'instruction' is empty" in text
    assert f"{d / 'orphan.txt'}: no source image orphan" in text
    out = tmp_path / "mine.jsonl"
    assert build_manifest.main(["--source", "folder", "--root", str(d), "--out", str(out)]) == 0
    assert read_manifest(out)[0] == items
