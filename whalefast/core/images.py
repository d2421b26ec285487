"""Photos: listing, decoding to upright 8-bit RGB, fluke crops, and the input sizes and scales options give."""

from __future__ import annotations

import os
import re
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from whalefast.core.errors import WhalefastError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def list_images(folder: str | os.PathLike) -> list[str]:
    """Names of the image files in `folder`, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WhalefastError(f"{folder}: folder not found")
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB: EXIF orientation applied, greyscale replicated, CMYK/palette/16-bit converted."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((arr * (255.0 / (65535.0 if arr.max() > 255 else 255.0))).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (0, 0, 0))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


Size = tuple[int, int]  # (height, width) in pixels

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the upright photo

MAX_SIDE = 2048  # the largest input side: the decoded-image cache holds height x width x 3 bytes per photo

BOX_MARGIN = 0.1  # a crop keeps this share of the box's width and height on each side, so no fluke tip is cut


def parse_size(text: str | int, option: str = "--size") -> Size:
    """'224' -> (224, 224); '128x256' -> (128, 256) (height x width); a one-line error otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if not match:
        raise WhalefastError(f"{option} must be N or HEIGHTxWIDTH in pixels (e.g. 224 or 128x256), got {text!r}")
    h = int(match.group(1))
    w = int(match.group(2) or h)
    if min(h, w) < 16:
        raise WhalefastError(f"{option} must be at least 16 pixels each way, got {text!r}")
    if max(h, w) > MAX_SIDE:
        raise WhalefastError(f"{option} must be at most {MAX_SIDE} pixels each way, got {text!r}")
    return h, w


def as_size(value) -> Size:
    """A size given as an int (square), 'HxW' text or a (height, width) pair, as (height, width)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return parse_size(value)


def as_scales(value, option: str = "--tta-scales") -> tuple[float, ...]:
    """Test-time scale factors given as text ('6/7,1,8/7' or '0.86,1,1.14'), a number or a sequence, as a tuple of floats; a one-line error otherwise."""
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        scales = tuple(float(Fraction(str(p).strip())) for p in parts)
    except (ValueError, ZeroDivisionError):
        scales = ()
    if not scales or not all(0 < s <= 4 for s in scales):
        raise WhalefastError(f"{option} must be comma-separated factors between 0 and 4 (e.g. 6/7,1,8/7), got {value!r}")
    return scales


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(height, width) times `scale`, each rounded to a multiple of 8 pixels (at least 8)."""
    return tuple(max(8, round(side * scale / 8) * 8) for side in size)


def size_text(size) -> str:
    """(128, 256) -> '128x256'; (224, 224) -> '224'."""
    h, w = as_size(size)
    return str(h) if h == w else f"{h}x{w}"


def open_rgb(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Open an image as 8-bit RGB (see `to_rgb`); `draft_size` lets libjpeg decode a large JPEG at a reduced scale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            if draft_size and im.format == "JPEG":
                im.draft(im.mode, (draft_size, draft_size))
            im.load()
            return to_rgb(im)


def _upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of `im` once its EXIF orientation is applied."""
    w, h = im.size
    return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)


def photo_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of a photo as whalefast shows it (EXIF orientation applied), read from its header."""
    with Image.open(path) as im:
        return _upright_size(im)


def widen_box(box: Box, width: int, height: int, margin: float = BOX_MARGIN) -> Box:
    """`box` grown by `margin` of its size on each side, clipped to a width x height photo."""
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    return max(0.0, x0 - mx), max(0.0, y0 - my), min(float(width), x1 + mx), min(float(height), y1 + my)


def load_image(path: str | os.PathLike, size: Size, box: Box | None = None, margin: float = BOX_MARGIN, grey: bool = False) -> np.ndarray:
    """The photo, or its fluke `box` widened by `margin`, resized to size = (height, width): a (height, width, 3) uint8 array.

    With `grey`, colour photos are turned grey (three equal channels), like the greyscale ones.
    """
    h, w = size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            full_w, full_h = _upright_size(im)
            if box is not None:
                box = widen_box(box, full_w, full_h, margin)
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    box = None  # a box outside the photo: use the whole photo
            if im.format == "JPEG":  # let libjpeg decode at a reduced scale that still leaves 2x the pixels needed
                fx = 1.0 if box is None else (box[2] - box[0]) / full_w
                fy = 1.0 if box is None else (box[3] - box[1]) / full_h
                want = int(2 * max(w / fx, h / fy))
                im.draft(im.mode, (want, want))
            im.load()
            rgb = to_rgb(im)
    if grey:
        rgb = rgb.convert("L").convert("RGB")
    if box is not None:
        scale = rgb.width / full_w
        rgb = rgb.crop(tuple(round(v * scale) for v in box))
    return np.asarray(rgb.resize((w, h), Image.BILINEAR, reducing_gap=2.0), dtype=np.uint8)
