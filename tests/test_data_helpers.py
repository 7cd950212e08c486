"""Fixture builders shared by the tests/test_data_*.py files (no tests here)."""

from pathlib import Path

import numpy as np
from PIL import Image


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save_rgb(path, height: int, width: int, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb(height, width, seed)).save(path)
    return path


def truncate(path, keep: float = 0.5) -> Path:
    """Cut a file to `keep` of its bytes, as an interrupted download leaves it."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
