"""COCO 2017 green-mask pairs from a hand-made instances file: largest instance (polygon, RLE, compressed RLE;
crowds ignored), position word, the paper's instruction word for word, and the overlay pixel by pixel."""

import json

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from cogniedit_jax.data import build_manifest
from cogniedit_jax.data.coco_pairs import green_overlay, position_word, read_coco
from cogniedit_jax.data.images import load_rgb
from cogniedit_jax.data.manifest import read_manifest
from tests.test_data_helpers import save_rgb

H, W = 30, 60


def _box(r0, r1, c0, c1):
    m = np.zeros((H, W), np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE: run lengths of the column-major pixels, starting with a run of zeros."""
    flat = mask.ravel(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"size": [H, W], "counts": ([0] if flat[0] else []) + runs}


def _coco_fixture(tmp_path):
    images = tmp_path / "train2017"
    for i in (1, 2, 3, 4, 5, 8):
        save_rgb(images / f"{i:012d}.jpg", H, W, seed=i)
    save_rgb(images / f"{6:012d}.jpg", H, 50, seed=6)  # annotation below claims 60 wide
    compressed = mask_utils.encode(np.asfortranarray(_box(0, 6, 25, 35)))

    def ann(i, img, cat, seg, crowd=0):
        return {"id": i, "image_id": img, "category_id": cat, "segmentation": seg, "area": 0.0,
                "bbox": [0, 0, 1, 1], "iscrowd": crowd}

    data = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": H, "width": W} for i in range(1, 9)],
        "categories": [{"id": 17, "name": "cat", "supercategory": "animal"},
                       {"id": 67, "name": "dining table", "supercategory": "furniture"}],
        "annotations": [
            ann(10, 1, 17, [[2, 2, 10, 2, 10, 8, 2, 8]]),                 # small polygon, top left
            ann(11, 1, 67, _uncompressed_rle(_box(20, 30, 40, 60))),      # 200 px RLE, bottom right: largest
            ann(12, 1, 17, _uncompressed_rle(np.ones((H, W), np.uint8)), crowd=1),  # a crowd: never chosen
            ann(20, 2, 17, {"size": [H, W], "counts": compressed["counts"].decode()}),  # compressed RLE, top
            ann(30, 3, 17, [[2, 10, 12, 15, 2, 20]]),                     # polygon triangle, left
            ann(50, 5, 67, _uncompressed_rle(_box(0, 5, 0, 5)), crowd=1), # image 5: crowds only
            ann(60, 6, 17, [[2, 2, 10, 2, 10, 8]]),
            ann(70, 7, 17, [[2, 2, 10, 2, 10, 8]]),                       # image 7: file missing
            ann(80, 8, 17, [[2, 2, 10, 2]]),                              # image 8: polygon of 2 points
        ],
    }
    path = tmp_path / "annotations" / "instances_train2017.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    return path, images


def _instruction(name, position):
    return (f"Add a green segmentation mask (for object detection) to the {name} on the {position} "
            "of the image")


def test_pairs_instructions_and_overlays(tmp_path):
    ann_path, images = _coco_fixture(tmp_path)
    items, skips = read_coco(ann_path, images, tmp_path / "targets")
    by_id = {it.id: it for it in items}
    assert sorted(by_id) == ["coco2017:1", "coco2017:2", "coco2017:3"]
    assert by_id["coco2017:1"].instruction == _instruction("dining table", "bottom right")
    assert by_id["coco2017:2"].instruction == _instruction("cat", "top")
    assert by_id["coco2017:3"].instruction == _instruction("cat", "left")
    assert by_id["coco2017:1"].meta["annotation_id"] == 11 and by_id["coco2017:1"].meta["mask_area"] == 200

    # the target is the source with exactly the chosen mask blended half-way to green, the rest untouched
    item = by_id["coco2017:1"]
    src = np.asarray(load_rgb(item.source)).astype(np.int64)
    tgt = np.asarray(Image.open(item.target)).astype(np.int64)
    mask = _box(20, 30, 40, 60).astype(bool)
    expected_in = np.rint(0.5 * src[mask] + 0.5 * np.array([0, 255, 0])).astype(np.int64)
    np.testing.assert_array_equal(tgt[mask], expected_in)
    np.testing.assert_array_equal(tgt[~mask], src[~mask])
    # the compressed-RLE mask lands where it was drawn
    tgt2 = np.asarray(Image.open(by_id["coco2017:2"].target)).astype(np.int64)
    src2 = np.asarray(load_rgb(by_id["coco2017:2"].source)).astype(np.int64)
    changed, box = np.any(tgt2 != src2, axis=-1), _box(0, 6, 25, 35).astype(bool)
    assert changed[box].all() and not changed[~box].any()

    assert dict(skips.counts) == {"bad_annotation": 2, "missing": 1}
    text = "\n".join(skips.messages)
    assert f"{images / '000000000006.jpg'}: image is 50x30 but {ann_path} says 60x30" in text
    assert f"{images / '000000000007.jpg'}: no such file" in text
    assert (f"{ann_path}: image 8 (000000000008.jpg): annotation 80: polygon segmentation with no polygon "
            f"of 3 or more points") in text


def test_sampling_is_seeded_and_cli_writes_the_manifest(tmp_path, capsys):
    ann_path, images = _coco_fixture(tmp_path)
    a = read_coco(ann_path, images, tmp_path / "t", n=2, seed=5)[0]
    assert len(a) == 2 and a == read_coco(ann_path, images, tmp_path / "t", n=2, seed=5)[0]
    out = tmp_path / "coco.jsonl"
    assert build_manifest.main(["--source", "coco", "--annotations", str(ann_path), "--images", str(images),
                                "--targets", str(tmp_path / "t"), "--n", "2", "--seed", "5",
                                "--out", str(out)]) == 0
    assert read_manifest(out)[0] == a
    assert "wrote 2 items" in capsys.readouterr().out


def test_position_words_cover_the_grid():
    words = {}
    for r, c in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]:
        words[(r, c)] = position_word(_box(r * 10, r * 10 + 10, c * 20, c * 20 + 20))
    assert words == {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
                     (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}


def test_overlay_alpha():
    img = np.full((2, 2, 3), 100, np.uint8)
    mask = np.array([[1, 0], [0, 0]], bool)
    out = green_overlay(img, mask, alpha=0.25)
    assert out[0, 0].tolist() == [75, 139, 75] and out[1, 1].tolist() == [100, 100, 100]
