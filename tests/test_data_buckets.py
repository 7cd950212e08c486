"""Resolution buckets equal the Qwen-Image-Edit pipeline's (diffusers 0.42.1): sizes and resized pixels."""

import numpy as np
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
from PIL import Image

from cogniedit_jax.data.buckets import edit_dimensions, resize_to
from tests.test_data_helpers import rgb


def test_edit_dimensions_match_diffusers_on_a_grid_of_sizes():
    sizes = [(w, h) for w in range(16, 4097, 37) for h in range(16, 4097, 53)]
    sizes += [(640, 480), (480, 640), (640, 427), (1024, 1024), (1920, 1080), (3000, 2000), (512, 100)]
    checked = 0
    for w, h in sizes:
        ref_w, ref_h, _ = calculate_dimensions(1024 * 1024, w / h)
        multiple_of = 16  # the pipeline then floors to vae_scale_factor * 2
        ref = (ref_w // multiple_of * multiple_of, ref_h // multiple_of * multiple_of)
        assert edit_dimensions(w, h) == ref, (w, h)
        assert ref[0] % 32 == 0 and ref[1] % 32 == 0
        checked += 1
    assert checked > 2000


def test_extreme_aspect_ratio_is_refused():
    try:
        edit_dimensions(40000, 1)
    except ValueError as e:
        assert "aspect ratio of 40000x1 is too extreme" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_resize_matches_the_pipeline_image_processor():
    processor = VaeImageProcessor(vae_scale_factor=16)  # as QwenImageEditPipeline builds it
    for h, w in [(480, 640), (300, 200), (1100, 900)]:
        img = Image.fromarray(rgb(h, w, seed=h))
        tw, th = edit_dimensions(w, h)
        ours = np.asarray(resize_to(img, tw, th))
        ref = np.asarray(processor.resize(img, th, tw))
        assert ours.shape == (th, tw, 3)
        np.testing.assert_array_equal(ours, ref)
