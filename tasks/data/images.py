"""Image files of one digit framed as MNIST was built: 28 x 28, white ink on black, centred by mass."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from tasks.data.mnist import PIXELS, SIDE

BOX = 20  # MNIST fitted each digit's longer side into 20 px, then centred it by its centre of mass
INK = 0.1  # normalised intensity above which a pixel counts as ink when cropping
STROKE = 0.5  # anti-aliasing puts a bilevel stroke's edge where a pixel is half covered
# NIST's digits were bilevel, so MNIST's only grey pixels are anti-aliased edges on a background of exact zeros.
# Scaling a larger scan down rings, and scans carry noise: faint values around every stroke, which the batches' drift
# test counts as ink (pixels above 0). Below this share of the strongest ink, a scaled pixel is background.
FLOOR = 8 / 255
# Decoding works on float64 copies, about 40 bytes a pixel at the peak; 4096 x 4096 stays under a gigabyte.
MAX_PIXELS = 4096 * 4096


class ImageError(ValueError):
    """A file is not a usable digit image; the message names the file."""


def prepare(image_path: Path) -> np.ndarray:
    """Turn an image file of one digit into MNIST's framing: 784 float32 in [0, 1], white ink on black."""
    gray = load_gray(Path(image_path))
    ink = normalise_ink(gray, image_path)
    return frame(ink).reshape(PIXELS)


def load_gray(path: Path) -> np.ndarray:
    """Read any Pillow-readable image as a float grayscale array, transparency composited on white."""
    try:
        with warnings.catch_warnings():
            # The size check below replaces Pillow's decompression-bomb warning, which would repeat the error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened:
            # The header gives the size before any pixel is decoded, so a huge image costs nothing to refuse.
            width, height = opened.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"{path}: {width}x{height} pixels is more than predict accepts "
                                 f"({MAX_PIXELS:,} pixels); scale the image down first")
            opened.load()
            img = ImageOps.exif_transpose(opened)
            if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
                white = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, img.convert("RGBA"))
            # 16-bit and float modes are kept as they are: only relative intensities matter below.
            if img.mode not in ("L", "I", "F") and not img.mode.startswith("I;16"):
                img = img.convert("L")
            return np.asarray(img, dtype=np.float64)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: more pixels than predict accepts ({MAX_PIXELS:,} pixels); "
                         "scale the image down first") from None
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except Image.UnidentifiedImageError:  # Pillow's message would only name the file again
        raise ImageError(f"{path}: not a readable image") from None
    except (OSError, ValueError, SyntaxError) as exc:
        # Pillow raises OSError for truncated files, ValueError/SyntaxError for some malformed headers.
        raise ImageError(f"{path}: not a readable image ({first_line(exc)})") from None


def normalise_ink(gray: np.ndarray, path: Path) -> np.ndarray:
    """Map the background to 0 and the strongest ink to 1, inverting dark-on-light images."""
    if not np.isfinite(gray).all():
        raise ImageError(f"{path}: the image holds NaN or infinite pixel values")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > (gray.min() + gray.max()) / 2:
        gray = gray.max() - gray  # MNIST digits are light on a dark background
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background, peak = float(np.median(border)), float(gray.max())
    if peak - background <= 1e-6 * max(abs(peak), 1.0):
        raise ImageError(f"{path}: blank image, no digit found")
    return np.clip((gray - background) / (peak - background), 0.0, 1.0)


def frame(ink: np.ndarray) -> np.ndarray:
    """Crop to the ink, fit the strokes' longer side into 20 px and centre the result by its centre of mass in 28x28."""
    rows, cols = np.nonzero(ink > STROKE)
    strokes = max(np.ptp(rows), np.ptp(cols)) + 1
    rows, cols = np.nonzero(ink > INK)
    crop = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    # Sized by the strokes, not by the faint blur around them, which a larger scan spreads wider; all ink stays on.
    scale = min(BOX / strokes, SIDE / max(crop.shape))
    height, width = (max(1, round(n * scale)) for n in crop.shape)
    small = Image.fromarray(crop.astype(np.float32)).resize((width, height), Image.Resampling.LANCZOS)
    digit = np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)
    digit[digit < FLOOR * digit.max()] = 0.0

    ys, xs = np.indices(digit.shape)
    mass = digit.sum()
    cy, cx = (ys * digit).sum() / mass, (xs * digit).sum() / mass
    # MNIST's centres of mass sit at pixel (14, 14); clamp so that no ink falls off the canvas.
    top = int(np.clip(round(SIDE / 2 - cy), 0, SIDE - height))
    left = int(np.clip(round(SIDE / 2 - cx), 0, SIDE - width))
    canvas = np.zeros((SIDE, SIDE), np.float32)
    canvas[top:top + height, left:left + width] = digit
    return canvas


def first_line(exc: BaseException) -> str:
    """An exception's message in one line, or its type when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
