"""Safe image loading: mode conversions to 8-bit RGB with exact pixel checks, and every failure a DataError
whose message names the file."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cogniedit_jax.data.errors import DataError
from cogniedit_jax.data.images import load_rgb, probe_size
from tests.test_data_helpers import save_rgb, truncate


def _pixels(path):
    img = load_rgb(path)
    assert img.mode == "RGB"
    return np.asarray(img)


def test_cmyk_converts_to_rgb(tmp_path):
    path = tmp_path / "c.tif"
    Image.new("CMYK", (3, 2), (0, 255, 0, 0)).save(path)  # full magenta ink: R=255, G=0, B=255
    assert (_pixels(path) == [255, 0, 255]).all()


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = [0, 0, 0, 0]        # fully transparent black: must not come out black
    rgba[0, 1] = [10, 20, 30, 255]   # opaque: unchanged
    rgba[0, 2] = [0, 0, 0, 128]      # half: between black and white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    px = _pixels(tmp_path / "a.png")
    assert px[0, 0].tolist() == [255, 255, 255]
    assert px[0, 1].tolist() == [10, 20, 30]
    assert abs(int(px[0, 2, 0]) - 127) <= 1 and (px[0, 2] == px[0, 2, 0]).all()


def test_grey_alpha_and_palette_with_transparency(tmp_path):
    Image.fromarray(np.array([[[50, 0], [50, 255]]], np.uint8), "LA").save(tmp_path / "la.png")
    assert _pixels(tmp_path / "la.png").tolist() == [[[255] * 3, [50] * 3]]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "t.png", transparency=0)
    assert _pixels(tmp_path / "t.png").tolist() == [[[255, 255, 255], [200, 10, 10]]]
    pal.save(tmp_path / "p.gif")  # palette without transparency: colours kept exactly
    assert _pixels(tmp_path / "p.gif").tolist() == [[[0, 0, 0], [200, 10, 10]]]


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 40000, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    px = _pixels(tmp_path / "g16.png")
    assert px[..., 0].tolist() == [[0, 100, 156, 255]] and (px == px[..., :1]).all()


def test_one_bit_image(tmp_path):
    Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1").save(tmp_path / "b.png")
    assert _pixels(tmp_path / "b.png").tolist() == [[[0] * 3, [255] * 3]]


def test_exif_orientation_is_applied_in_probe_and_load(tmp_path):
    img = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "o.jpg", exif=exif)
    assert probe_size(tmp_path / "o.jpg") == (20, 40)
    assert load_rgb(tmp_path / "o.jpg").size == (20, 40)


def _png_header_only(path, width, height):
    """A PNG that claims width x height: what a decompression bomb's header looks like."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("fn", [load_rgb, probe_size])
def test_pixel_limit_is_checked_before_decoding(tmp_path, fn):
    path = _png_header_only(tmp_path / "bomb.png", 5000, 5000)  # 25 megapixels, 57 bytes on disk
    with pytest.raises(DataError, match=r"bomb\.png: 5000x5000 = 25000000 pixels exceeds the limit of 1000000"
                                        r" \(decompression-bomb guard\)") as e:
        fn(path, max_pixels=1_000_000)
    assert e.value.kind == "too_large"
    save_rgb(tmp_path / "small.png", 40, 40)
    with pytest.raises(DataError, match="exceeds the limit of 1000"):
        fn(tmp_path / "small.png", max_pixels=1000)
    # PIL's own guard (2 x Image.MAX_IMAGE_PIXELS) is a backstop above any limit we are given.
    path = _png_header_only(tmp_path / "bomb.png", 50000, 50000)
    with pytest.raises(DataError, match=r"bomb\.png: image too large to decode safely") as e:
        fn(path, max_pixels=10**12)
    assert e.value.kind == "too_large"


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated_image(tmp_path, ext):
    path = truncate(save_rgb(tmp_path / f"t.{ext}", 64, 64))
    with pytest.raises(DataError, match=rf"t\.{ext}: cannot decode image: image file is truncated") as e:
        load_rgb(path)
    assert e.value.kind == "truncated" and e.value.where == str(path)


def test_corrupt_missing_and_float_images(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(DataError, match=r"junk\.jpg: not a readable image") as e:
        load_rgb(tmp_path / "junk.jpg")
    assert e.value.kind == "corrupt"
    with pytest.raises(DataError, match=r"nothere\.png: no such file") as e:
        load_rgb(tmp_path / "nothere.png")
    assert e.value.kind == "missing"
    Image.fromarray(np.ones((2, 2), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif: 32-bit float images have no defined 8-bit range") as e:
        load_rgb(tmp_path / "f.tif")
    assert e.value.kind == "bad_mode"
