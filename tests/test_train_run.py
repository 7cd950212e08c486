"""configs/tiny.py end to end: metrics, TensorBoard, checkpoints, sample grids, the exported LoRA (ours and
diffusers/PEFT read it), exact resumption, non-finite updates and judge failures, and a 4-device mesh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from cogniedit_jax.config import load_config
from cogniedit_jax.metrics import read_metrics
from cogniedit_jax.models import MMDiTConfig
from cogniedit_jax.models.lora import WEIGHT_NAME, load_diffusers_lora
from cogniedit_jax.models.token_focus import load_focus
from cogniedit_jax.train import EXPORT_FOLDER, RandomConditions, TrainingError, train

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
FIELDS = (
    "step",
    "loss",
    "reward_mean",
    "reward_std",
    "ratio_first",
    "clipfrac",
    "kl",
    "grad_norm",
    "lr",
    "invalid_rewards",
    "seconds_rollout",
    "seconds_judge",
    "seconds_update",
)


def run(workdir, *overrides):
    return train(load_config(TINY, list(overrides)), workdir)


def tiny_model(config) -> MMDiTConfig:
    arch = dict(config.model.arch)
    return MMDiTConfig(**{**arch, "axes_dims_rope": tuple(arch["axes_dims_rope"])})


def without_timing(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    return workdir, run(workdir)


def test_tiny_run_writes_metrics_checkpoints_grids_and_export(full):
    workdir, result = full
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and result["step"] == 4
    for r in rows:
        assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
        assert abs(r["ratio_first"] - 1) < 1e-5, r  # theta = theta_old at the first update of each rollout
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["invalid_rewards"] == 0
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[-1]["lr"] < rows[0]["lr"]  # cosine decay
    assert len({r["reward_mean"] for r in rows}) == 4 and all(r["reward_std"] > 0 for r in rows)
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "4",
    ]  # keep=2
    assert sorted(p.name for p in (workdir / "grids").iterdir()) == [
        "step_000001.png",
        "step_000002.png",
        "step_000004.png",
    ]


def test_exported_lora_loads_here_and_in_diffusers(full):
    workdir, _ = full
    config = load_config(TINY)
    cfg = tiny_model(config)
    export = workdir / EXPORT_FOLDER
    lora = load_diffusers_lora(export, cfg)
    assert lora.scale == config.lora.alpha / config.lora.rank
    b = np.asarray(lora.params["blocks"]["attn"]["to_q"]["b"])
    assert b.shape == (2, 2, 32) and np.abs(b).max() > 0  # trained away from its zero init
    focus = load_focus(export, cfg)
    assert np.abs(np.asarray(focus.params["gate"])).max() > 0

    import torch
    from diffusers import QwenImageTransformer2DModel
    from peft.utils import get_peft_model_state_dict

    model = QwenImageTransformer2DModel(**cfg.to_diffusers())
    model.load_lora_adapter(str(export), weight_name=WEIGHT_NAME, prefix="transformer")
    (adapter,) = model.peft_config
    with torch.no_grad():
        theirs = {k: v.numpy() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    file = load_file(export / WEIGHT_NAME)
    assert len(theirs) == len(file) == 2 * 8 * cfg.num_layers
    for key, value in file.items():
        np.testing.assert_array_equal(theirs[key.removeprefix("transformer.")], value)
    assert model.peft_config[adapter].lora_alpha / model.peft_config[adapter].r == lora.scale


def test_resumed_run_equals_uninterrupted_run_bitwise(full, tmp_path):
    workdir, _ = full
    first = run(tmp_path, "stop_after=2")
    assert first["step"] == 2 and not (tmp_path / EXPORT_FOLDER).exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    # A run that died after step 3 without a checkpoint leaves a metrics line the resume must drop.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    second = run(tmp_path)
    assert second["step"] == 4
    assert without_timing(read_metrics(tmp_path)) == without_timing(read_metrics(workdir))
    for name in (WEIGHT_NAME, "focus.safetensors"):
        ours, reference = (
            load_file(tmp_path / EXPORT_FOLDER / name),
            load_file(workdir / EXPORT_FOLDER / name),
        )
        assert ours.keys() == reference.keys()
        for k in ours:
            np.testing.assert_array_equal(ours[k], reference[k], err_msg=f"{name}: {k}")


class NaNConditions(RandomConditions):
    """Conditions whose text states are NaN from step 1 on: every update there is non-finite."""

    def global_batch(self, step):
        batch = super().global_batch(step)
        if step >= 1:
            batch["cond"] = batch["cond"].replace(prompt_embeds=batch["cond"].prompt_embeds * np.nan)
        return batch


def flaky_judge(config):
    """Fails on every other call: those samples are invalid, the run goes on."""
    calls = []

    def judge(edited, sources, instructions):
        calls.append(1)
        if len(calls) % 2 == 0:
            raise ConnectionError("judge server went away")
        return np.full(len(edited), 9.0, np.float32) + np.arange(len(edited)), np.ones(len(edited), bool)

    return judge


def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path):
    with pytest.raises(TrainingError, match=r"2 non-finite updates in a row \(max_bad_updates=2\) at step 3"):
        run(tmp_path, "data.source=tests.test_train_run:NaNConditions", "max_bad_updates=2", "total_steps=4")
    rows = read_metrics(tmp_path)
    assert [r["skipped_updates"] for r in rows] == [0, 1, 1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]


def test_judge_failures_mark_samples_invalid(tmp_path):
    # stop_after (not total_steps) keeps the lr schedule, so the compiled update is reused.
    result = run(tmp_path, "judge.source=tests.test_train_run:flaky_judge", "stop_after=2",
                 "log.grid_every=0", "checkpoint.every=1")
    rows = read_metrics(tmp_path)
    assert [r["invalid_rewards"] for r in rows] == [0, 8] and result["invalid_rewards"] == 8
    assert rows[1]["loss"] == 0 and rows[1]["grad_norm"] == 0  # nothing to learn from, and no NaN either
    # ... and no step: Adam's momentum alone would have moved the params.
    saved = [ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / s / "arrays")["trainable"]
             for s in ("1", "2")]
    assert jax.tree.all(jax.tree.map(np.array_equal, *saved))
    assert rows[0]["reward_mean"] == pytest.approx(12.5)


def judge_then_sigterm(config):
    """Scores like a judge, and at the second call the process gets SIGTERM (a preempted job)."""
    calls = []

    def judge(edited, sources, instructions):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return np.arange(len(edited), dtype=np.float32), np.ones(len(edited), bool)

    return judge


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    result = run(tmp_path, "judge.source=tests.test_train_run:judge_then_sigterm", "log.grid_every=0",
                 "checkpoint.every=100")
    assert result["interrupted"] == "SIGTERM" and result["step"] == 2  # the step in flight is finished
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is removed again


SHARDED = """
import json, sys
from cogniedit_jax.config import load_config
from cogniedit_jax.train import train
import jax
assert jax.device_count() == 8, jax.devices()
train(load_config(sys.argv[1], ["mesh.data=2", "mesh.fsdp=4", "stop_after=2"]), sys.argv[2])
"""


@pytest.mark.slow  # a second process compiling the sharded programs: ~1 CPU minute, minutes on a busy machine
def test_eight_device_mesh_equals_one_device(full, tmp_path):
    """data 2 x fsdp 4 simulated CPU devices: frozen weights sharded, rows over the mesh; the first steps'
    reward, gradient norm and loss equal the single-device run's."""
    workdir, _ = full
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED, TINY, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded, single = read_metrics(tmp_path), read_metrics(workdir)[:2]
    assert [r["step"] for r in sharded] == [1, 2]
    for a, b in zip(sharded, single):
        print({k: (a[k], b[k]) for k in ("reward_mean", "grad_norm", "loss")})
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], rel=1e-3)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert abs(a["ratio_first"] - 1) < 1e-5


@pytest.mark.slow  # another optimizer spec: the update compiles again
def test_several_updates_per_rollout(tmp_path):
    result = run(tmp_path, "updates_per_rollout=3", "total_steps=2", "log.grid_every=0")
    rows = read_metrics(tmp_path)
    assert result["step"] == 2 and all(abs(r["ratio_first"] - 1) < 1e-5 for r in rows)
    # 6 updates, warm-up int(0.1 * 6) = 0: the last one (index 5) uses lr * (1 + cos(pi * 5 / 6)) / 2.
    assert rows[-1]["lr"] == pytest.approx(1e-3 * (1 + np.cos(np.pi * 5 / 6)) / 2, rel=1e-5)
    assert (tmp_path / EXPORT_FOLDER / WEIGHT_NAME).is_file()
