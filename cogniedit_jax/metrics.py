"""What a training run writes for people to read: `metrics.jsonl` (one JSON object per step), TensorBoard
event files (tensorboardX: no TensorFlow needed) and PNG grids of source | sampled edits with their rewards.

On resume the metrics written after the restored checkpoint's step (by a run that died later) are dropped,
from the JSONL file and, through `purge_step`, from TensorBoard, so both read as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

METRICS_NAME = "metrics.jsonl"
TB_FOLDER = "tensorboard"


def _jsonable(v):
    v = v.item() if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0) else v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the line parseable and the value visible
    return v


class MetricsWriter:
    def __init__(self, workdir, resume_step: int = 0, tensorboard: bool = True):
        from tensorboardX import SummaryWriter

        self.path = Path(workdir) / METRICS_NAME
        kept = []
        if self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln)["step"] <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(ln + "\n" for ln in kept))
        self.file = self.path.open("a")
        self.tb = (
            SummaryWriter(str(Path(workdir) / TB_FOLDER), purge_step=resume_step + 1) if tensorboard else None
        )

    def write(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir) -> list[dict]:
    return [json.loads(ln) for ln in (Path(workdir) / METRICS_NAME).read_text().splitlines() if ln.strip()]


def sample_grid(
    sources: np.ndarray, edits: np.ndarray, rewards: np.ndarray, instructions=None, cell: int = 128
) -> np.ndarray:
    """One row per instance: its source, then its G edits, each labelled with its reward (nan: invalid).
    sources uint8 [B, H, W, 3], edits uint8 [B, G, H', W', 3], rewards [B, G] -> uint8 [rows, cols, 3]."""
    b, g = edits.shape[:2]
    label = 14
    grid = Image.new("RGB", ((g + 1) * cell, b * (cell + label)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(b):
        y = i * (cell + label)
        cells = [(sources[i], (instructions[i] if instructions else "source")[:24])]
        cells += [(edits[i, j], f"R={float(rewards[i, j]):.3g}") for j in range(g)]
        for j, (img, text) in enumerate(cells):
            grid.paste(
                Image.fromarray(np.asarray(img, np.uint8)).resize((cell, cell), Image.NEAREST),
                (j * cell, y + label),
            )
            draw.text((j * cell + 2, y + 1), text, fill="black")
    return np.asarray(grid)


def save_grid(path, grid: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def line_chart(path, series: list[dict], title: str, x_label: str = "", size=(720, 400), pad: int = 56) -> Path:
    """A PNG line chart drawn with PIL (no plotting library in the dependencies). series: dicts with x, y
    (sequences), colour (RGB), optional width and label (drawn in a legend, top left)."""
    xs = np.concatenate([np.asarray(s["x"], np.float64) for s in series])
    ys = np.concatenate([np.asarray(s["y"], np.float64) for s in series])
    x0, x1 = float(xs.min()), float(xs.max()) + 1e-12
    lo, hi = float(ys.min()), float(ys.max()) + 1e-6
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)

    def xy(x, y):
        return [(pad + (a - x0) / (x1 - x0) * (w - 2 * pad), h - pad - (b - lo) / (hi - lo) * (h - 2 * pad))
                for a, b in zip(x, y)]

    draw.rectangle([pad, pad, w - pad, h - pad], outline="black")
    labelled = 0
    for s in series:
        draw.line(xy(s["x"], s["y"]), fill=tuple(s["colour"]), width=s.get("width", 1))
        if s.get("label"):
            y = pad + 6 + 14 * labelled
            draw.line([(pad + 6, y + 6), (pad + 26, y + 6)], fill=tuple(s["colour"]), width=3)
            draw.text((pad + 32, y), s["label"], fill="black")
            labelled += 1
    draw.text((pad, 8), title, fill="black")
    draw.text((4, pad - 6), f"{hi:.3g}", fill="black")
    draw.text((4, h - pad - 6), f"{lo:.3g}", fill="black")
    draw.text((pad, h - pad + 8), f"{x0:.3g}", fill="black")
    draw.text((w - pad - 40, h - pad + 8), f"{x1:.3g}", fill="black")
    draw.text((w // 2 - 3 * len(x_label), h - pad + 24), x_label, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
