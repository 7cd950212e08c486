"""The plan command: the tiny config compiled on simulated CPU devices from abstract shapes."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from cogniedit_jax import plan
from cogniedit_jax.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


def test_tiny_on_four_devices_does_not_fit_a_tiny_card():
    """A fresh process (jax not started) gets 4 simulated devices; the table has both steps; a 1 KiB card
    gives the "does not fit" verdict and exit code 1."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cogniedit_jax.plan",
            "--config",
            TINY,
            "--devices",
            "4",
            "--device-memory-gb",
            "1e-6",
            "--config.mesh.data=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        check=False,
    )
    print(proc.stdout)
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = proc.stdout
    assert "mesh {'data': 2, 'fsdp': 2} on 4 cpu devices" in out
    number = r"\s+([\d.]+)"
    rows = {
        m[0]: [float(v) for v in m[1:]]
        for m in re.findall(r"^(rollout|update) step" + number * 7 + "$", out, re.MULTILINE)
    }
    assert set(rows) == {"rollout", "update"}, out
    for arguments, outputs, temps, aliased, total, scores, _ in rows.values():
        assert total == pytest.approx(arguments + outputs + temps - aliased, abs=2e-3)
        assert 0 < scores <= temps + 1e-3  # XLA's CPU attention materialises the scores
    assert re.search(r"peak per device [\d.]+ MiB vs 1e-06 GiB: does not fit$", out, re.MULTILINE), out


def fake_result(total_bytes: int) -> dict:
    row = {
        "arguments": total_bytes,
        "outputs": 0,
        "temps": 0,
        "aliased": 0,
        "total": total_bytes,
        "scores": 0,
    }
    model = plan.MMDiTConfig(num_layers=2)
    return {
        "mesh": {"data": 1, "fsdp": 8},
        "model": model,
        "text_len": 1024,
        "policy": plan.PolicyConfig(model, ((1, 64, 64), (1, 64, 64))),
        "rollout": row,
        "update": row,
        "rollout_seconds": 1.0,
        "update_seconds": 1.0,
        "params": 10,
        "trainable_params": 1,
        "frozen_per_device": 2 * plan.GB,
        "opt_state_per_device": plan.GB // 2,
    }


def test_verdict_counts_the_resident_optimizer_state():
    """The rollout's peak adds the optimizer state (on the device, though not the rollout's argument)."""
    table, fits = plan.report(fake_result(10 * plan.GB), 80)
    assert fits and table.endswith("peak per device 10.50 GiB vs 80 GiB: fits")
    table, fits = plan.report(fake_result(10 * plan.GB), 10.4)
    assert not fits and table.endswith("peak per device 10.50 GiB vs 10.4 GiB: does not fit")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--devices", "8"], "--config is required"),
        (["--config", TINY, "--devices", "0"], "--devices=0: expected > 0"),
        (["--config", TINY, "--layers", "two"], "--layers='two': expected int"),
        (["--config", TINY, "--bogus"], "unknown argument '--bogus'"),
    ],
)
def test_bad_arguments_are_named(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan.parse_args(argv)


def test_started_backend_reruns_in_a_fresh_process(capfd):
    """jax already runs here with its own devices: main re-executes itself with 4 simulated devices (a mesh
    that does not divide them fails there, before any compile, and its error comes back)."""
    assert jax.device_count() != 4
    assert plan.main(["--config", TINY, "--devices", "4", "--config.mesh.data=3"]) == 2
    assert "mesh: 3 does not divide the 4 devices" in capfd.readouterr().err


def test_converted_model_architecture_comes_from_its_config_json(tmp_path):
    """Only transformer/config.json is read (no weights there); --layers overrides its depth."""
    (tmp_path / "transformer").mkdir()
    plan.MMDiTConfig(num_layers=3, num_attention_heads=2).to_json(tmp_path / "transformer" / "config.json")
    config = load_config(TINY, ["model.source=converted", f"model.path={tmp_path}"])
    cfg = plan.model_config(config, None)
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_impl) == (3, 2, "xla")
    assert plan.model_config(config, 1).num_layers == 1
    assert plan.model_config(load_config(TINY), None).num_layers == 2  # model.arch for other sources
