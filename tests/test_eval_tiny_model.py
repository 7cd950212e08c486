"""Both benchmark commands end to end with a tiny real model: random diffusers Qwen-Image transformer and VAE
saved, converted by convert/qwen_image_edit.py, loaded by the trainer's `load_editor`, conditioned by a
spawned sidecar's encoder (tiny random Qwen2.5-VL), with a LoRA and token focus exported as the trainer exports
them; the judge is the rule chat. Small edit area (--target-area) and 2 steps keep it to minutes on a CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from cogniedit_jax.eval.runner import read_records
from tests.eval_fixtures import write_gedit_parquet, write_kris

ROOT = Path(__file__).resolve().parents[1]
VL_HIDDEN = 32  # the tiny Qwen2.5-VL's hidden size = the transformer's joint_attention_dim


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from cogniedit_jax.bench.vae import random_diffusers_vae
    from cogniedit_jax.models import load_transformer
    from cogniedit_jax.models.lora import LoraConfig, init_lora, save_diffusers_lora
    from cogniedit_jax.models.token_focus import FocusConfig, init_focus, save_focus
    from cogniedit_jax.sidecar.tiny import write_tiny_checkpoint
    from tests.reference import tiny_transformer

    root = tmp_path_factory.mktemp("tiny-qie")
    tiny_transformer(joint_attention_dim=VL_HIDDEN).save_pretrained(root / "diffusers" / "transformer")
    random_diffusers_vae(seed=1, base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                         latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[1.5, 0.7, 2.0, 1.1]).save_pretrained(
        root / "diffusers" / "vae")
    out = subprocess.run([sys.executable, "convert/qwen_image_edit.py", "--no-progress", "--transformer",
                          root / "diffusers" / "transformer", "--vae", root / "diffusers" / "vae",
                          "--out", root / "converted"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    cfg, _ = load_transformer(root / "converted")
    key_l, key_f = jax.random.split(jax.random.key(0))
    lora = init_lora(cfg, LoraConfig(rank=2, alpha=2), key_l)
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # B != 0: the LoRA changes the edit
    save_diffusers_lora(lora, cfg, root / "export")
    save_focus(init_focus(cfg, FocusConfig(xi=3, predictor_dim=8), key_f), root / "export")
    return {"converted": root / "converted", "export": root / "export",
            "vl": write_tiny_checkpoint(root / "tiny-vl")}


def run_cli(checkpoint, tmp_path, bench, data, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "cogniedit_jax.eval", "--config", str(ROOT / "configs" / "tiny.py"),
           "--config-override", "model.source=converted", "--config-override",
           f"model.path={checkpoint['converted']}", "--bench", bench, "--data", str(data),
           "--out", str(tmp_path / bench), "--encoder", str(checkpoint["vl"]), "--target-area", str(64 * 64),
           "--steps", "2", "--rule-chat", "tests.eval_fixtures:rule_chat", "--batch-size", "2", *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.mark.slow  # ~3 min on 2 busy cores: two CLI processes, each compiling and spawning a sidecar
def test_gedit_and_kris_commands_with_a_tiny_model(checkpoint, tmp_path):
    write_gedit_parquet(tmp_path / "gedit-data")
    run_cli(checkpoint, tmp_path, "gedit", tmp_path / "gedit-data", "--limit", "3")
    records = read_records(tmp_path / "gedit")
    assert [r["status"] for r in records] == ["ok"] * 3
    edit = np.asarray(Image.open(tmp_path / "gedit" / records[0]["image"]))
    assert edit.shape == (64, 64, 3) and edit.std() > 0  # the 64x64 bucket of a 32x24 source, decoded

    write_kris(tmp_path / "kris-data")
    out = run_cli(checkpoint, tmp_path, "kris", tmp_path / "kris-data", "--lora", str(checkpoint["export"]))
    records = {r["id"]: r for r in read_records(tmp_path / "kris")}
    assert records["temporal_prediction/1"]["status"] == "unsupported"
    assert records["humanities/1"]["status"] == "ok" and records["humanities/1"]["scores"]["KP"] == 2
    assert "| **LoRA** (this run)" in out.stdout
    summary = json.loads((tmp_path / "kris" / "summary.json").read_text())
    assert summary["counts"] == {"judge_failed": 1, "ok": 3, "unsupported": 1}
