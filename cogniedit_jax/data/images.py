"""Safe image loading: every file comes back as an 8-bit RGB PIL image or raises `DataError` naming the file.

- missing / unreadable / not an image / truncated / corrupt: DataError (kinds missing, corrupt, truncated).
- decompression bombs: the pixel count is read from the header and checked against `max_pixels` before
  anything is decoded (kind too_large). PIL's own global guard (2 x `Image.MAX_IMAGE_PIXELS`) stays as a
  backstop and is reported the same way; we never change PIL's globals, which other threads share.
- modes: CMYK and YCbCr through PIL's converter; alpha (RGBA, LA, PA, palette with transparency) composited on
  white, because the colour stored under a fully transparent pixel is arbitrary (often black); 16-bit grey
  (I;16*, I) scaled to 8 bits (PIL's own convert would clip everything above 255 to white); palette expanded.
- EXIF orientation is applied, as diffusers' `load_image` does.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cogniedit_jax.data.errors import DataError

# 8192 x 8192: well above any training image (Qwen-Image-Edit resizes to ~1 MP) and below PIL's warning level.
DEFAULT_MAX_PIXELS = 8192 * 8192
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255)


def _os_error(path: Path, what: str, e: OSError) -> DataError:
    kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
    return DataError(str(path), kind, f"{what}: {e}")


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open (header only) and check the size; the caller decodes."""
    if not path.is_file():
        raise DataError(str(path), "missing", "no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise DataError(str(path), "too_large", f"image too large to decode safely ({e})")
    except UnidentifiedImageError:
        raise DataError(str(path), "corrupt", "not a readable image (unknown or damaged format)")
    except OSError as e:
        raise _os_error(path, "cannot open image", e)
    w, h = img.size
    if w <= 0 or h <= 0:
        img.close()
        raise DataError(str(path), "corrupt", f"image has an empty size {w}x{h}")
    if w * h > max_pixels:
        img.close()
        raise DataError(str(path), "too_large",
                        f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                        "(decompression-bomb guard)")
    return img


def probe_size(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header alone: cheap enough for a whole data set."""
    with _open(Path(path), max_pixels) as img:
        w, h = img.size
        raw = img.info.get("exif")  # EXIF read with the header (`getexif()` would decode a whole PNG)
    if raw:
        exif = Image.Exif()
        exif.load(raw)
        if exif.get(0x0112, 1) in (5, 6, 7, 8):  # orientations that transpose or rotate by 90 degrees
            w, h = h, w
    return w, h


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode == "L" and "transparency" in img.info:
        img, mode = img.convert("LA"), "LA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey: 65535 -> 255. PIL presents 16-bit PNGs as mode I; values beyond 16 bits are clipped.
        arr = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.round(arr).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        raise DataError(getattr(img, "filename", "") or "<image>", "bad_mode",
                        "32-bit float images have no defined 8-bit range; convert them first")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` fully into an 8-bit RGB image, or raise DataError naming it."""
    path = Path(path)
    img = _open(path, max_pixels)
    try:
        img.load()
        out = to_rgb(ImageOps.exif_transpose(img))
        # close() below frees the decoded pixels of `img` itself, so an unconverted image must be copied out.
        return out.copy() if out is img else out
    except DataError as e:
        raise DataError(str(path), e.kind, e.message)
    except OSError as e:
        raise _os_error(path, "cannot decode image", e)
    except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(str(path), "corrupt", f"cannot decode image: {e}")
    finally:
        img.close()
