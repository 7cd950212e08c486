"""The demo ablations: the table and the reward-vs-FLOPs plot from run results, and the sweep end to end on the
demo's smoke config (resumable: a finished run is read back, not retrained)."""

import json

import numpy as np
import pytest
from PIL import Image

from cogniedit_jax.bench import ablations
from cogniedit_jax.demo import run


def summary(reward):
    return {"num": 4, "reward_mean": reward, "alignment": 2.0, "coherence": 4.0, "consistency": 4.0,
            "exact": 0.25, "exact_per_attribute": {"colour": 0.5, "position": 0.0, "quantity": 0.25}}


def result(arm, seed, reward, steps=30):
    rng = np.random.default_rng(seed)
    return {"arm": arm, "seed": seed, "after": summary(reward), "seconds": 1.0,
            "flops_per_step": {"rollout": 1e9, "update": 2e9, "step": 3e9},
            "curve": {"step": list(range(1, steps + 1)), "reward": list(10 + rng.random(steps))}}


def test_table_gives_mean_and_spread_over_seeds_and_the_change_against_the_base():
    before = summary(10.0)
    md = ablations.table(before, [result("full", 0, 11.0), result("full", 1, 12.0), result("standard", 0, 9.0)])
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()[2:]}
    assert set(rows) == {"w/o both (base editor)", ablations.ARMS["full"][0], ablations.ARMS["standard"][0]}
    assert "11.500 +- 0.500" in rows[ablations.ARMS["full"][0]] and "+15.0%" in rows[ablations.ARMS["full"][0]]
    assert "9.000" in rows[ablations.ARMS["standard"][0]] and "-10.0%" in rows[ablations.ARMS["standard"][0]]


def drawn(path, arm):
    return (np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3) == ablations.COLOURS[arm]).all(-1).any()


def test_plot_draws_every_arm_and_reads_them_against_the_control(tmp_path):
    runs = [result("full", 0, 11.0), result("standard", 0, 9.0), result("standard", 1, 9.5)]
    out = ablations.plot(runs, tmp_path / "curve.png", window=5)
    assert drawn(out, "full") and drawn(out, "standard")
    # with a control, arms are drawn as differences from it, and only for the seeds it covers
    same = dict(result("control", 0, 10.0), curve=runs[0]["curve"])
    out = ablations.plot([*runs, same], tmp_path / "paired.png", window=5)
    assert drawn(out, "full") and drawn(out, "standard") and not drawn(out, "control")


@pytest.mark.slow  # two short training runs of the demo and their held-out judgements: ~1-2 min on 2 cores
def test_sweep_end_to_end_and_resume(tmp_path):
    argv = ["--out", str(tmp_path), "--config", f"{run.DEFAULT_CONFIG}:smoke", "--seeds", "0",
            "--arms", "full,standard"]
    assert ablations.main(argv) == 0
    report = json.loads((tmp_path / "ablations.json").read_text())
    assert [(r["arm"], r["seed"]) for r in report["runs"]] == [("full", 0), ("standard", 0)]
    for r in report["runs"]:
        assert 3 <= r["after"]["reward_mean"] <= 15 and r["flops_per_step"]["step"] > 0
        assert len(r["curve"]["reward"]) == 2
    assert (tmp_path / "reward_vs_flops.png").is_file() and "| w/o both" in (tmp_path / "ablations.md").read_text()
    marker = tmp_path / "full" / "seed0" / ablations.RESULT_NAME
    stamp = marker.stat().st_mtime_ns
    assert ablations.main(argv) == 0 and marker.stat().st_mtime_ns == stamp
