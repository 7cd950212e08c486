"""The embedded demo end to end: judge the pretrained demo editor on held-out shapes edits, train dense GRPO +
token focus on it (`cogniedit_jax.train`), judge the trained editor on the same edits.

    python -m cogniedit_jax.demo.run --workdir DIR [--config configs/demo.py] [--config.total_steps=N ...]

Writes, next to the trainer's outputs: DIR/summary.json (held-out reward, scores and exact edits per attribute
before and after, and the relative change), DIR/reward_curve.png (training reward per step) and
DIR/before_after.png (source | reference target | before | after).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from cogniedit_jax import config as config_lib
from cogniedit_jax.data import shapes
from cogniedit_jax.demo import evaluation, plugin
from cogniedit_jax.metrics import line_chart, read_metrics

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "demo.py")


def heldout(config, ed, examples, lora=None, focus=None):
    key = jax.random.key(config.eval.seed)
    images = evaluation.edit_examples(ed, examples, key, config.eval.steps, enhanced=config.data.enhanced,
                                      lora=lora, focus=focus)
    return images, evaluation.summarize(evaluation.judge_images(images, examples))


def reward_curve(workdir: Path, out: Path, window: int = 10) -> Path:
    """The training reward per step (light) and its running mean over `window` steps (dark)."""
    rows = [r for r in read_metrics(workdir) if np.isfinite(r.get("reward_mean", np.nan))]
    steps = np.array([r["step"] for r in rows], np.float64)
    reward = np.array([r["reward_mean"] for r in rows], np.float64)
    smooth = np.convolve(reward, np.ones(window) / window, mode="valid") if len(reward) >= window else reward
    return line_chart(out, [{"x": steps, "y": reward, "colour": (150, 180, 230)},
                            {"x": steps[len(steps) - len(smooth):], "y": smooth, "colour": (20, 60, 160),
                             "width": 3}],
                      f"training reward (A + Co + Cs) per step; dark: mean of {window}", "step")


def train_and_judge(config, workdir: Path, ed, examples) -> dict:
    """Train on the demo (`cogniedit_jax.train`) into `workdir`, then judge the exported LoRA (and focus) on
    the held-out examples -> {"after": summary, "images": edits, "train": the trainer's result, "seconds"}."""
    from cogniedit_jax.models.lora import load_diffusers_lora
    from cogniedit_jax.models.token_focus import load_focus
    from cogniedit_jax.train import EXPORT_FOLDER, train

    start = time.perf_counter()
    result = train(config, workdir)
    seconds = time.perf_counter() - start
    export = workdir / EXPORT_FOLDER
    lora = load_diffusers_lora(export, ed.cfg)
    focus = load_focus(export, ed.cfg) if config.focus.enabled else None
    images, after = heldout(config, ed, examples, lora, focus)
    return {"after": after, "images": images, "seconds": seconds,
            "train": {k: v for k, v in result.items() if not k.startswith("seconds")}}


def relative_change(before: dict, after: dict) -> float:
    return (after["reward_mean"] - before["reward_mean"]) / before["reward_mean"]


def run(config, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    ed = plugin.demo_editor(config)
    examples = shapes.make_examples(config.eval.seed, config.eval.num, config.data.combine_p)
    start = time.perf_counter()
    before_images, before = heldout(config, ed, examples)
    trained = train_and_judge(config, workdir, ed, examples)
    summary = {
        "heldout": {"seed": config.eval.seed, "num": config.eval.num, "steps": config.eval.steps},
        "before": before, "after": trained["after"],
        "relative_change": relative_change(before, trained["after"]),
        "train": trained["train"],
        "seconds": {"total": time.perf_counter() - start, "train": trained["seconds"]},
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    reward_curve(workdir, workdir / "reward_curve.png")
    n = config.eval.grid
    render = lambda scenes: np.stack([shapes.render(s) for s in scenes])  # noqa: E731
    evaluation.save_grid(workdir / "before_after.png", [render([ex.source for ex in examples[:n]]),
                                                        render([ex.target for ex in examples[:n]]),
                                                        before_images[:n], trained["images"][:n]])
    return summary


def main(argv=None) -> int:
    from cogniedit_jax.train import parse_args

    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", DEFAULT_CONFIG, *argv]
    try:
        spec, workdir, overrides = parse_args(argv)
        config = config_lib.load_config(spec, overrides)
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = run(config, Path(workdir))
    print(json.dumps({"reward_before": s["before"]["reward_mean"], "reward_after": s["after"]["reward_mean"],
                      "relative_change": s["relative_change"], "seconds": s["seconds"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
