"""`python -m cogniedit_jax.edit`: sizes, the editor plug-in, and the errors a user meets first."""

import numpy as np
import pytest
from PIL import Image

from cogniedit_jax import edit
from cogniedit_jax.data.buckets import edit_dimensions

SEEN = {}


def fake_editor(config, lora, args):
    """An editor plug-in: inverts the image, remembering what it was given."""

    def edit_fn(images, instructions):
        SEEN.update(
            shape=images.shape, instructions=list(instructions), lora=lora, cfg=config.policy.cfg_scale
        )
        return 255 - images

    return edit_fn


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 150, 3), np.uint8)).save(path)
    return path


def test_edit_resizes_like_the_pipeline_and_writes_the_edit(tmp_path, source):
    out = tmp_path / "sub" / "out.png"
    assert (
        edit.main(
            [
                "--config",
                "configs/tiny.py",
                "--image",
                str(source),
                "--instruction",
                "make it red",
                "--out",
                str(out),
                "--editor",
                "tests.test_edit_cli:fake_editor",
                "--target-area",
                str(64 * 64),
                "--cfg",
                "2.5",
                "--lora",
                "some/dir",
            ]
        )
        == 0
    )
    width, height = edit_dimensions(150, 90, 64 * 64)
    assert SEEN == dict(shape=(1, height, width, 3), instructions=["make it red"], lora="some/dir", cfg=2.5)
    resized = np.asarray(Image.open(source).resize((width, height), Image.LANCZOS, reducing_gap=None))
    np.testing.assert_array_equal(np.asarray(Image.open(out)), 255 - resized)


def test_clear_errors(tmp_path, source):
    base = ["--config", "configs/tiny.py", "--out", str(tmp_path / "o.png")]
    with pytest.raises(SystemExit, match="missing.png"):
        edit.main(base + ["--image", str(tmp_path / "missing.png"), "--instruction", "x"])
    with pytest.raises(SystemExit, match="--instruction is empty"):
        edit.main(base + ["--image", str(source), "--instruction", "  "])
    with pytest.raises(ValueError, match="model.source"):  # the tiny config's random model has no VAE
        edit.main(base + ["--image", str(source), "--instruction", "x", "--encoder", str(tmp_path)])
    with pytest.raises(SystemExit, match="--encoder DIR"):
        edit.main(
            base
            + ["--image", str(source), "--instruction", "x", "--config-override", "model.source=converted"]
        )
