"""The plan command: the tiny config compiled on simulated CPU devices from abstract shapes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cogniedit_jax import plan
from cogniedit_jax.config import ConfigError

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


def test_verdict_and_depth_extrapolation():
    """The rollout's peak adds the optimizer state (resident, not its argument); two compiled depths give
    each step's growth per layer."""
    table, fits = plan.report(fake_result(10 * plan.GB), 80)
    assert fits and table.endswith("peak per device 10.50 GiB vs 80 GiB: fits")
    # 2 and 3 layers compiled: the update's total grows 1 GiB per layer -> 10 + 58 at 60 layers.
    deeper = fake_result(10 * plan.GB)
    deeper["update"] = {**deeper["update"], "total": 11 * plan.GB}
    table, fits = plan.report(fake_result(10 * plan.GB), 60, deeper, full_layers=60)
    assert "update 68.000 GiB (+1.000 per layer)" in table
    assert not fits and table.endswith("peak per device 68.00 GiB vs 60 GiB: does not fit")


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
