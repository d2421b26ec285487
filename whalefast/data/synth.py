"""Synthetic fluke photos in the Kaggle layout: the embedded demo dataset."""

from __future__ import annotations

import io
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from whalefast import NEW_WHALE
from whalefast.core.console import progress_bar
from whalefast.core.errors import WhalefastError
from whalefast.core.files import write_csv
from whalefast.core.parallel import process_pool

TEMPLATE_W, TEMPLATE_H = 512, 256
NEW_WHALE_TRAIN_SHARE = 0.08
DUPLICATE_SHARE = 0.08
UNSEEN_TEST_SHARE = 0.30
GREYSCALE_SHARE = 1 / 3
TEST_DUPLICATE_SHARE = 0.03
MAX_PHOTOS_PER_ID = 60


@dataclass(frozen=True)
class SynthConfig:
    """Sizes and seed of a synthetic dataset."""

    seed: int = 0
    whales: int = 300
    train_images: int = 2500
    test_images: int = 600


@dataclass(frozen=True)
class Photo:
    """One photo to render: file name, the individual shown and its own random seed."""

    name: str
    individual: int
    seed: int


def photos_per_id(n_ids: int, n_images: int, rng: np.random.Generator) -> np.ndarray:
    """Long-tailed photo counts (a truncated power law, like the real 2018 labels) summing to `n_images`."""
    if n_images < n_ids:
        raise WhalefastError(f"need at least one training photo per whale ({n_images} photos for {n_ids} whales)")
    k = np.arange(1, MAX_PHOTOS_PER_ID + 1)
    target_mean = n_images / n_ids
    lo, hi = 0.0, 6.0
    for _ in range(60):  # bisection on the exponent so that the expected count matches the mean
        a = (lo + hi) / 2
        p = k**-a
        p /= p.sum()
        if (p * k).sum() > target_mean:
            lo = a
        else:
            hi = a
    counts = rng.choice(k, size=n_ids, p=p)
    largest = np.argsort(-counts)[: max(1, n_ids // 100)]  # a few ids with 20+ photos, as in the real data
    counts[largest] = np.maximum(counts[largest], 20)
    while counts.sum() != n_images:  # nudge to the exact total, keeping at least one photo per id
        diff = n_images - counts.sum()
        idx = rng.choice(n_ids, size=min(abs(diff), n_ids), replace=False, p=counts / counts.sum())
        counts[idx] = np.clip(counts[idx] + np.sign(diff), 1, None)
    return counts


def _individual_rng(seed: int, individual: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1, individual])


def fluke_template(seed: int, individual: int) -> Image.Image:
    """The individual's fluke: its silhouette and pigmentation, as RGBA on transparent ground."""
    rng = _individual_rng(seed, individual)
    w, h = TEMPLATE_W, TEMPLATE_H
    cx = w / 2
    span_l = rng.uniform(0.40, 0.48) * w
    span_r = span_l * rng.uniform(0.88, 1.12)  # lobe asymmetry
    tip_l = rng.uniform(0.18, 0.42) * h
    tip_r = tip_l + rng.uniform(-0.08, 0.08) * h
    arch = rng.uniform(0.05, 0.20) * h
    notch_depth = rng.uniform(0.06, 0.20) * h
    tip_power = rng.uniform(0.6, 2.2)  # pointed (<1) or rounded (>1) tips
    scallop_amp = rng.uniform(0.0, 0.035) * h
    scallop_freq = rng.uniform(6, 18)
    scallop_phase = rng.uniform(0, 2 * math.pi)
    notches = [(rng.uniform(-0.95, 0.95), rng.uniform(0.02, 0.09) * h, rng.uniform(0.01, 0.04)) for _ in range(rng.integers(0, 5))]
    lead_depth = rng.uniform(0.62, 0.8) * h
    ped_w = rng.uniform(0.06, 0.10) * w

    def trailing(u: float) -> float:  # u in [-1, 1] across the span, y of the trailing (top) edge
        y = tip_l if u < 0 else tip_r
        y += (arch - y) * (1 - abs(u) ** tip_power) * 0.6
        y += notch_depth * math.exp(-((u / 0.04) ** 2))
        y += scallop_amp * math.sin(scallop_freq * u * math.pi + scallop_phase)
        for pos, depth, width in notches:
            y += depth * math.exp(-(((u - pos) / width) ** 2))
        return y

    def leading(u: float) -> float:
        t = 1 - abs(u)
        base = tip_l if u < 0 else tip_r
        return base + 0.02 * h + (lead_depth - base) * (1 - (1 - t) ** 1.6)

    n = 160
    us = np.linspace(-1, 1, n)
    top = [(cx + u * (span_l if u < 0 else span_r), trailing(u)) for u in us]
    bottom = [(cx + u * (span_l if u < 0 else span_r) * 0.92, leading(u)) for u in us[::-1]]
    # Splice the peduncle (tail stock) into the leading edge at the centre.
    mid = len(bottom) // 2
    bottom = bottom[: mid - 4] + [(cx + ped_w / 2, h), (cx - ped_w / 2, h)] + bottom[mid + 4 :]
    outline = top + bottom

    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon(outline, fill=255)

    base_tone = int(rng.uniform(15, 60))
    skin = Image.new("RGB", (w, h), (base_tone, base_tone, base_tone + int(rng.uniform(0, 12))))
    paint = ImageDraw.Draw(skin)
    white_share = rng.uniform(0.0, 1.0)
    for _ in range(rng.integers(2, 7)):  # large white patches: the coarse identity signal
        px, py = rng.uniform(0.15, 0.85) * w, rng.uniform(0.35, 0.6) * h
        rx, ry = rng.uniform(0.05, 0.10 + 0.25 * white_share) * w, rng.uniform(0.05, 0.10 + 0.25 * white_share) * h
        tone = int(rng.uniform(200, 250))
        paint.ellipse([px - rx, py - ry, px + rx, py + ry], fill=(tone, tone, tone))
    for _ in range(rng.integers(0, 12)):  # dark spots on the white
        px, py, r = rng.uniform(0.15, 0.85) * w, rng.uniform(0.35, 0.6) * h, rng.uniform(3, 14)
        paint.ellipse([px - r, py - r, px + r, py + r], fill=(base_tone,) * 3)
    for _ in range(rng.integers(0, 4)):  # rake-mark scars
        x0, y0 = rng.uniform(0.1, 0.9) * w, rng.uniform(0.3, 0.8) * h
        dx, dy = rng.uniform(-60, 60), rng.uniform(-25, 25)
        for j in range(rng.integers(2, 4)):
            paint.line([x0 + 6 * j, y0 + 4 * j, x0 + dx + 6 * j, y0 + dy + 4 * j], fill=(225, 225, 225), width=3)
    skin = skin.filter(ImageFilter.GaussianBlur(1.5))
    template = skin.convert("RGBA")
    template.putalpha(mask)
    return template


def _perspective_coeffs(src: list[tuple[float, float]], dst: list[tuple[float, float]]) -> list[float]:
    a, b = [], []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b += [u, v]
    return np.linalg.solve(np.array(a, dtype=float), np.array(b, dtype=float)).tolist()


def render_photo(template: Image.Image, seed: int) -> tuple[bytes, tuple[float, float, float, float]]:
    """One JPEG of `template` with its own pose, light, sea, splash, blur, size and quality, and the fluke's box (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    width = int(rng.uniform(300, 1100))
    height = int(width * rng.uniform(0.38, 0.75))

    sea_top = np.array([rng.uniform(60, 140), rng.uniform(90, 160), rng.uniform(110, 200)])
    sea_bottom = sea_top * rng.uniform(0.4, 0.8)
    ramp = np.linspace(0, 1, height)[:, None, None]
    column = (sea_top * (1 - ramp) + sea_bottom * ramp).astype(np.uint8)
    background = Image.fromarray(column).resize((width, height), Image.NEAREST)
    if rng.random() < 0.4:  # a band of sky or coast behind the sea
        band = int(height * rng.uniform(0.05, 0.25))
        ImageDraw.Draw(background).rectangle([0, 0, width, band], fill=tuple(int(c) for c in rng.uniform(150, 230, size=3)))
    waves = ImageDraw.Draw(background)
    for _ in range(int(rng.integers(10, 40))):
        y = rng.uniform(0, height)
        x = rng.uniform(-0.2, 1.0) * width
        length = rng.uniform(0.05, 0.4) * width
        tone = tuple(int(c) for c in (sea_top * rng.uniform(0.6, 1.6)).clip(0, 255))
        waves.line([x, y, x + length, y + rng.uniform(-4, 4)], fill=tone, width=int(rng.integers(1, 4)))

    # Scale, rotation, shift and a mild perspective, as one warp of the template onto the canvas.
    # Far or near, anywhere in the frame (as in real photos): what a fluke box and a crop are for.
    span = rng.uniform(0.3, 0.9)  # the fluke's width as a share of the photo's
    scale = span * width / TEMPLATE_W
    angle = math.radians(rng.uniform(-12, 12))
    room_x, room_y = (1 - span) * width / 2, max(0.0, height - span * width * TEMPLATE_H / TEMPLATE_W) / 2
    cx = width / 2 + rng.uniform(-0.9, 0.9) * room_x
    cy = height / 2 + rng.uniform(-0.9, 0.9) * room_y
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    corners = [(0, 0), (TEMPLATE_W, 0), (TEMPLATE_W, TEMPLATE_H), (0, TEMPLATE_H)]
    jitter = 0.05 * TEMPLATE_W
    placed = []
    for x, y in corners:
        x, y = x - TEMPLATE_W / 2 + rng.uniform(-jitter, jitter), y - TEMPLATE_H / 2 + rng.uniform(-jitter, jitter) / 2
        placed.append((cx + cos * x - sin * y, cy + sin * x + cos * y))
    xs, ys = [p[0] for p in placed], [p[1] for p in placed]
    x0, y0 = int(max(0, min(xs))), int(max(0, min(ys)))
    x1, y1 = int(min(width, max(xs) + 1)), int(min(height, max(ys) + 1))
    box = (0.0, 0.0, float(width), float(height))
    if x1 > x0 and y1 > y0:
        local = [(x - x0, y - y0) for x, y in placed]
        fluke = template.transform((x1 - x0, y1 - y0), Image.PERSPECTIVE, _perspective_coeffs(corners, local), Image.BILINEAR)
        background.paste(fluke, (x0, y0), fluke)
        visible = fluke.getchannel("A").point(lambda a: 255 if a > 127 else 0).getbbox()
        if visible:
            box = (float(x0 + visible[0]), float(y0 + visible[1]), float(x0 + visible[2]), float(y0 + visible[3]))

    if rng.random() < 0.5:  # splash partly hiding the fluke, drawn and blurred at quarter size
        sw, sh = max(1, width // 4), max(1, height // 4)
        splash = Image.new("L", (sw, sh), 0)
        spray = ImageDraw.Draw(splash)
        for _ in range(int(rng.integers(3, 15))):
            x, y = rng.uniform(0, sw), rng.uniform(0.5, 1.0) * sh
            r = rng.uniform(0.02, 0.08) * sw
            spray.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.uniform(120, 230)))
        splash = splash.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5))).resize((width, height), Image.BILINEAR)
        background.paste(Image.new("RGB", (width, height), (235, 240, 245)), (0, 0), splash)

    gain, offset = rng.uniform(0.7, 1.25), rng.uniform(-25, 25)  # exposure and brightness
    photo = background.point(lambda v: v * gain + offset)
    grain = rng.normal(128, rng.uniform(1, 6), size=(height // 2 + 1, width // 2 + 1)).clip(0, 255).astype(np.uint8)
    noise = Image.fromarray(grain).resize((width, height), Image.NEAREST).convert("RGB")
    photo = ImageChops.add(photo, noise, scale=1.0, offset=-128)
    if rng.random() < 0.5:
        photo = photo.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 1.5)))
    if rng.random() < GREYSCALE_SHARE:
        photo = photo.convert("L")
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=int(rng.integers(60, 96)))
    return buffer.getvalue(), box


def _render_chunk(args: tuple[int, list[Photo], str]) -> list[tuple[str, tuple]]:
    seed, photos, folder = args
    templates: dict[int, Image.Image] = {}
    boxes = []
    for photo in photos:
        if photo.individual not in templates:
            templates[photo.individual] = fluke_template(seed, photo.individual)
        jpeg, box = render_photo(templates[photo.individual], photo.seed)
        Path(folder, photo.name).write_bytes(jpeg)
        boxes.append((photo.name, box))
    return boxes


def _near_duplicate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str, float]:
    """A re-encoded or resized copy of a JPEG, or the same bytes; with the copy's scale."""
    kind = rng.choice(["exact", "reencoded", "resized"])
    if kind == "exact":
        return data, "exact", 1.0
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        scale = 1.0
        if kind == "resized":
            factor = rng.uniform(0.6, 0.9)
            width = max(8, int(im.width * factor))
            scale = width / im.width
            im = im.resize((width, max(8, int(im.height * factor))), Image.BILINEAR)
        buffer = io.BytesIO()
        im.save(buffer, format="JPEG", quality=int(rng.integers(70, 96)))
    return buffer.getvalue(), str(kind), scale


def _fresh(rng: np.random.Generator, used: set[str], digits: int, pattern: str) -> str:
    """`pattern` filled with `digits` random hex digits, never one in `used` (which it joins)."""
    while True:
        text = pattern.format(f"{rng.integers(0, 16**digits):0{digits}x}")
        if text not in used:
            used.add(text)
            return text


def _name(rng: np.random.Generator, used: set[str]) -> str:
    return _fresh(rng, used, 8, "{}.jpg")


def _whale_id(rng: np.random.Generator, used: set[str]) -> str:
    return _fresh(rng, used, 7, "w_{}")


def plan_dataset(cfg: SynthConfig) -> dict:
    """Decide every photo, label and duplicate without rendering anything."""
    rng = np.random.default_rng([cfg.seed, 0])
    names: set[str] = set()
    ids: set[str] = set()
    n_dup = int(round(cfg.train_images * DUPLICATE_SHARE))
    n_new_train = int(round(cfg.train_images * NEW_WHALE_TRAIN_SHARE))
    n_known_unique = cfg.train_images - n_dup - n_new_train
    counts = photos_per_id(cfg.whales, n_known_unique, rng)
    whale_ids = [_whale_id(rng, ids) for _ in range(cfg.whales)]

    individual = 0
    train: list[tuple[Photo, str]] = []
    for wid, count in zip(whale_ids, counts):
        for _ in range(count):
            train.append((Photo(_name(rng, names), individual, int(rng.integers(2**31))), wid))
        individual += 1
    for _ in range(n_new_train):  # new_whale: animals outside the catalogue, one photo each
        train.append((Photo(_name(rng, names), individual, int(rng.integers(2**31))), NEW_WHALE))
        individual += 1

    duplicates = []  # (copy name, original name, label, kind seed)
    originals = rng.choice(len(train), size=n_dup, replace=True)
    for orig in originals:
        photo, label = train[orig]
        roll = rng.random()
        if label != NEW_WHALE and roll < 0.15:
            copy_label = NEW_WHALE  # conflict: a known id and new_whale
        elif label != NEW_WHALE and roll < 0.22:
            copy_label = whale_ids[int(rng.integers(len(whale_ids)))]  # conflict: two known ids
        else:
            copy_label = label
        duplicates.append((_name(rng, names), photo.name, copy_label, int(rng.integers(2**31))))

    n_unseen = int(round(cfg.test_images * UNSEEN_TEST_SHARE))
    n_test_dup = max(1, int(round(cfg.test_images * TEST_DUPLICATE_SHARE)))
    n_catalogued = cfg.test_images - n_unseen - n_test_dup
    weights = np.sqrt(counts) / np.sqrt(counts).sum()
    test: list[tuple[Photo, str]] = []
    for choice in rng.choice(cfg.whales, size=n_catalogued, p=weights):
        test.append((Photo(_name(rng, names), int(choice), int(rng.integers(2**31))), whale_ids[choice]))
    for _ in range(n_unseen):
        test.append((Photo(_name(rng, names), individual, int(rng.integers(2**31))), NEW_WHALE))
        individual += 1
    test_duplicates = []
    for orig in rng.choice(len(train), size=n_test_dup, replace=False):
        photo, label = train[orig]
        test_duplicates.append((_name(rng, names), photo.name, label, int(rng.integers(2**31))))
    return {"train": train, "duplicates": duplicates, "test": test, "test_duplicates": test_duplicates}


def check_output_folder(out: Path) -> None:
    """Fail with one line if `out` cannot hold a dataset."""
    if out.exists() and not out.is_dir():
        raise WhalefastError(f"{out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WhalefastError(f"{out}: cannot create folder ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise WhalefastError(f"{out}: folder is not writable")
    if any((out / name).exists() for name in ("train.csv", "train", "test")):
        raise WhalefastError(f"{out}: already holds a dataset (train.csv, train/ or test/); choose an empty folder")


def generate(out: str | os.PathLike, cfg: SynthConfig = SynthConfig(), workers: int | None = None) -> Path:
    """Write a synthetic dataset in the Kaggle layout to `out` (plus test_answers.csv, planted_duplicates.csv and the flukes' boxes.csv)."""
    out = Path(out)
    check_output_folder(out)
    if cfg.whales < 1 or cfg.test_images < 4:
        raise WhalefastError("need at least 1 whale and 4 test images")
    plan = plan_dataset(cfg)
    staging = out / ".synth-staging"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "train").mkdir(parents=True)
    (staging / "test").mkdir()

    jobs = [(p, "train") for p, _ in plan["train"]] + [(p, "test") for p, _ in plan["test"]]
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    by_individual: dict[tuple[int, str], list[Photo]] = {}
    for photo, split in jobs:
        by_individual.setdefault((photo.individual % (workers * 4), split), []).append(photo)
    chunks = [(cfg.seed, photos, str(staging / split)) for (_, split), photos in sorted(by_individual.items())]
    boxes: dict[str, tuple] = {}
    with process_pool(workers) as pool, progress_bar("rendering photos", len(jobs)) as advance:
        for done in pool.map(_render_chunk, chunks):
            boxes.update(done)
            advance(len(done))

    records = []
    for split, copies in (("train", plan["duplicates"]), ("test", plan["test_duplicates"])):
        for copy_name, orig_name, _, dup_seed in copies:
            data, kind, scale = _near_duplicate((staging / "train" / orig_name).read_bytes(), np.random.default_rng(dup_seed))
            (staging / split / copy_name).write_bytes(data)
            boxes[copy_name] = tuple(v * scale for v in boxes[orig_name])
            records.append((copy_name, orig_name, split, kind))

    train_rows = [(p.name, label) for p, label in plan["train"]] + [(c, lab) for c, _, lab, _ in plan["duplicates"]]
    train_df = pd.DataFrame(sorted(train_rows), columns=["Image", "Id"])
    answers = [(p.name, label) for p, label in plan["test"]] + [(c, lab) for c, _, lab, _ in plan["test_duplicates"]]
    answers_df = pd.DataFrame(sorted(answers), columns=["Image", "Id"])
    top = [NEW_WHALE] + train_df.loc[train_df.Id != NEW_WHALE, "Id"].value_counts().index[:4].tolist()
    sample = pd.DataFrame({"Image": answers_df.Image, "Id": " ".join(top)})

    write_csv(train_df, staging / "train.csv")
    write_csv(answers_df, staging / "test_answers.csv")
    write_csv(sample, staging / "sample_submission.csv")
    write_csv(pd.DataFrame(records, columns=["Image", "Original", "Split", "Kind"]), staging / "planted_duplicates.csv")
    box_rows = [(name, *(round(v, 2) for v in box)) for name, box in sorted(boxes.items())]
    write_csv(pd.DataFrame(box_rows, columns=["Image", "x0", "y0", "x1", "y1"]), staging / "boxes.csv")
    for item in sorted(staging.iterdir()):
        os.replace(item, out / item.name)
    staging.rmdir()
    return out
