"""Benchmark loaders on folders in the published layouts, the resumable edit/judge loop with a stand-in editor
and a rule chat, the report files, and the CLI end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogniedit_jax.data.buckets import edit_dimensions
from cogniedit_jax.data.errors import DataError
from cogniedit_jax.eval.aggregate import gedit_summary, kris_summary
from cogniedit_jax.eval.gedit import load_gedit
from cogniedit_jax.eval.kris import load_kris
from cogniedit_jax.eval.report import write_report
from cogniedit_jax.eval.runner import read_records, run_items
from cogniedit_jax.eval.scoring import judge_gedit, judge_kris
from tests.eval_fixtures import (
    GEDIT_ROWS,
    image,
    invert_edit,
    png_bytes,
    rule_chat,
    write_gedit_parquet,
    write_kris,
)

ROOT = Path(__file__).resolve().parents[1]


def test_gedit_parquet_layout(tmp_path):
    write_gedit_parquet(tmp_path / "GEdit-Bench")
    items = load_gedit(tmp_path / "GEdit-Bench")
    assert [it.id for it in items] == [f"{lang}/{task}/{key}" for key, task, lang, _, _ in GEDIT_ROWS]
    first = items[0]
    assert first.meta == {"language": "en", "intersection": True, "key": "k1"}
    assert isinstance(first.source, bytes) and isinstance(first.judge_source, bytes)
    assert first.source != first.judge_source  # the editor gets input_image_raw, the judge input_image


def test_gedit_jsonl_layout_and_refusals(tmp_path):
    Image.fromarray(image(1)).save(tmp_path / "a.png")
    row = {"key": "x", "task_type": "tone_transfer", "instruction": "warmer", "instruction_language": "en",
           "input_image": "a.png", "Intersection_exist": False}
    (tmp_path / "gedit.jsonl").write_text(json.dumps(row) + "\n")
    [item] = load_gedit(tmp_path)
    assert item.source == tmp_path / "a.png" == item.judge_source
    for bad, message in [({"instruction_language": "zh"}, "'zh' is not one of"),
                         ({"task_type": "recolor"}, "task_type 'recolor'"),
                         ({"Intersection_exist": "yes"}, "is not a bool")]:
        (tmp_path / "gedit.jsonl").write_text(json.dumps({**row, **bad}) + "\n")
        with pytest.raises(DataError, match=message) as e:
            load_gedit(tmp_path)
        assert "gedit.jsonl:1" in str(e.value)
    (tmp_path / "gedit.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match="repeated key"):
        load_gedit(tmp_path)


def test_kris_layout_and_refusals(tmp_path):
    write_kris(tmp_path)
    items = {it.id: it for it in load_kris(tmp_path)}
    assert list(items) == ["color_change/1", "viewpoint_change/1", "temporal_prediction/1", "humanities/1",
                           "humanities/2"]  # the summary script's folder order
    assert items["humanities/1"].meta == {"task_group": "Social Science", "knowledge": True, "explain": "armour"}
    assert not items["color_change/1"].meta["knowledge"]
    assert items["viewpoint_change/1"].truth.name == "1_gt.jpg"
    assert len(items["temporal_prediction/1"].extra_sources) == 2
    (tmp_path / "KRIS_Bench" / "object_count").mkdir()
    with pytest.raises(DataError, match=r"unknown task folder\(s\) \['object_count'\]"):
        load_kris(tmp_path)
    (tmp_path / "KRIS_Bench" / "object_count").rmdir()
    (tmp_path / "KRIS_Bench" / "humanities" / "annotation.json").write_text(json.dumps({"1": {"ori_img": "1.jpg"}}))
    with pytest.raises(DataError, match="humanities.*ins_en"):
        load_kris(tmp_path)


def test_kris_run_scores_reports_and_counts_every_item(tmp_path):
    write_kris(tmp_path / "data")
    (tmp_path / "data" / "KRIS_Bench" / "color_change" / "1.jpg").write_bytes(b"not a jpeg")
    items = load_kris(tmp_path / "data")
    records = run_items(items, tmp_path / "out", invert_edit,
                        lambda its, s, e: judge_kris(rule_chat, its, s, e, retries=1), batch_size=2)
    by_id = {r["id"]: r for r in records}
    assert [r["id"] for r in records] == [it.id for it in items]
    assert by_id["color_change/1"]["status"] == "source_error" and "color_change/1.jpg" in by_id["color_change/1"]["error"]
    assert by_id["temporal_prediction/1"]["status"] == "unsupported"
    ok = by_id["humanities/1"]
    assert ok["status"] == "ok" and set(ok["scores"]) == {"VC", "VQ", "IF", "KP"} and ok["scores"]["KP"] == 2
    edited = np.asarray(Image.open(tmp_path / "out" / ok["image"]))
    assert edited.shape == (864, 1216, 3) and edit_dimensions(28, 20) == (1216, 864)  # the ~1 MP bucket
    garbled = by_id["humanities/2"]  # no score in the VC/IF answers (twice: greedy + 1 retry); VQ is read
    assert garbled["status"] == "judge_failed" and garbled["judge_failed"] == ["IF", "VC"]
    assert garbled["scores"] == {"VC": None, "VQ": garbled["scores"]["VQ"], "IF": None, "KP": None}
    assert garbled["judge"]["VC"]["attempts"] == 2
    assert by_id["viewpoint_change/1"]["scores"]["IF"] is not None
    summary = kris_summary(records)
    assert summary["counts"] == {"judge_failed": 1, "ok": 2, "source_error": 1, "unsupported": 1}
    md = write_report("kris", summary, records, tmp_path / "out", "fake")
    text = md.read_text()
    assert "| CogniEdit | 80.60 | 92.40" in text and "**fake** (this run)" in text
    assert "unsupported 1" in text and "humanities (VC 1, VQ 2, IF 1, KP 1 scored of 2)" in text
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.count("<tr><td>") == len(items) and "judge failed: IF, VC" in page
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["counts"] == summary["counts"]


class Killed(Exception):
    pass


def test_resume_runs_only_the_remaining_items(tmp_path):
    write_gedit_parquet(tmp_path / "data")
    items = load_gedit(tmp_path / "data")
    edited_ids, judged = [], []

    def edit(images, instructions):
        edited_ids.extend(instructions)
        return invert_edit(images, instructions)

    def judge(its, srcs, eds):
        judged.extend(it.id for it in its)
        if len(judged) > 2:
            raise Killed  # the run dies after editing the third batch, before judging it
        return judge_gedit(rule_chat, its, srcs, eds, retries=0)

    with pytest.raises(Killed):
        run_items(items, tmp_path / "out", edit, judge)
    first = [r["id"] for r in read_records(tmp_path / "out")]
    assert len(first) == 2
    killed_edit = set(judged[2:]) - set(first)
    edited_ids.clear()
    judged.clear()
    with open(tmp_path / "out" / "items.jsonl", "a") as f:
        f.write('{"id": "torn')  # a record cut off mid-write counts as not finished
    records = run_items(items, tmp_path / "out", edit, lambda *a: judge_gedit(rule_chat, *a, retries=0))
    assert [r["id"] for r in records] == [it.id for it in items]
    assert len(edited_ids) == len(items) - 2 - len(killed_edit)  # neither finished nor already-edited items rerun
    assert sorted({r["id"] for r in read_records(tmp_path / "out")}) == sorted(it.id for it in items)
    failed = [r for r in records if r["status"] == "judge_failed"]
    assert [r["id"] for r in failed] == ["en/text_change/k4"] and failed[0]["scores"] is None
    s = gedit_summary(records)
    assert s["en"]["full"]["counts"] == {"judge_failed": 1, "ok": 3}
    assert s["en"]["full"]["scores"]["PQ"] == pytest.approx(6.0)  # rule: PQ = min(8, 6)


def test_cli_end_to_end_and_resumed(tmp_path):
    write_gedit_parquet(tmp_path / "data")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "cogniedit_jax.eval", "--config", str(ROOT / "configs" / "tiny.py"),
           "--bench", "gedit", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
           "--editor", "tests.eval_fixtures:invert_editor", "--rule-chat", "tests.eval_fixtures:rule_chat",
           "--label", "inverted", "--batch-size", "2"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| **inverted** (en, this run) |" in out.stdout and "| Qwen-Image-Edit | 7.819" in out.stdout
    assert len(read_records(tmp_path / "out")) == len(GEDIT_ROWS)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         check=False)
    assert again.returncode == 0 and f"{len(GEDIT_ROWS)} finished before, 0 to run" in again.stderr
    assert (tmp_path / "out" / "report.md").read_text() in again.stdout


def test_png_bytes_roundtrip():
    a = image(3)
    assert np.array_equal(np.asarray(Image.open(__import__("io").BytesIO(png_bytes(a)))), a)


def test_shapes_world_command(tmp_path):
    """`--bench shapes`: held-out demo edits at the world's own size, the rule judge, the demo's summary; an
    editor that paints the exact outcome is judged exact everywhere, and no sidecar is started."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "cogniedit_jax.eval", "--config", str(ROOT / "configs" / "tiny.py"),
           "--bench", "shapes", "--data", "7:12", "--out", str(tmp_path / "out"), "--batch-size", "4",
           "--editor", "tests.eval_fixtures:oracle_shapes_editor", "--label", "oracle"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num"] == 12 and summary["exact"] == 1.0 and summary["counts"] == {"ok": 12}
    assert summary["consistency"] == 5.0 and "| **oracle** (this run) |" in out.stdout
    [record] = [r for r in read_records(tmp_path / "out") if r["id"] == "shapes/7/0"]
    assert np.asarray(Image.open(tmp_path / "out" / record["image"])).shape == (24, 24, 3)  # not resized


def test_demo_editor_edits_at_the_world_size_with_an_exported_lora(tmp_path):
    """The shapes benchmark's built-in editor: a saved demo editor folder and a LoRA export (B != 0)."""
    import dataclasses

    import jax

    from cogniedit_jax.config import load_config
    from cogniedit_jax.demo.editor import save_editor
    from cogniedit_jax.demo.pretrain import init_editor
    from cogniedit_jax.eval.shapes import demo_editor, load_shapes
    from cogniedit_jax.models.lora import LoraConfig, init_lora, save_diffusers_lora

    editor = init_editor(load_config(str(ROOT / "configs" / "demo_pretrain.py")), jax.random.key(0))
    leaves, tree = jax.tree.flatten(editor.params)  # away from the zero-initialised output layers
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = tree.unflatten([x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    save_editor(dataclasses.replace(editor, params=params), tmp_path / "editor")
    lora = jax.tree.map(lambda x: x + 0.1, init_lora(editor.cfg, LoraConfig(rank=2, alpha=2), jax.random.key(1)))
    save_diffusers_lora(lora, editor.cfg, tmp_path / "export")
    items = load_shapes("3:2")
    sources = np.stack([np.asarray(Image.open(__import__("io").BytesIO(it.source))) for it in items])
    plain = demo_editor(None, tmp_path / "editor", 2, 0)(sources, [it.instruction for it in items])
    tuned = demo_editor(tmp_path / "export", tmp_path / "editor", 2, 0)(sources, [it.instruction for it in items])
    assert plain.shape == tuned.shape == (2, 24, 24, 3) and plain.dtype == np.uint8
    assert not np.array_equal(plain, tuned)  # the LoRA was applied
