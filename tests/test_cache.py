"""The decoded-image cache: each photo is decoded once and again only when its file or its box changes."""

import os

import numpy as np
import pytest
from PIL import Image

from whalefast.core.images import load_image
from whalefast.data import cache
from whalefast.data.cache import build_cache


@pytest.fixture
def photos(tmp_path):
    """Four small photos in tmp_path/train, each a different grey."""
    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((30, 60, 3), 40 * i + 20, np.uint8)).save(folder / f"p{i}.png")
    return folder


@pytest.fixture
def decoded(tmp_path, monkeypatch):
    """The names of the photos the cache decodes from here on (worker processes write them to a log file)."""
    log = tmp_path / "decoded.log"
    log.write_text("")

    def counting(path, *args, **kwargs):
        with open(log, "a") as f:
            f.write(os.path.basename(path) + "\n")
        return load_image(path, *args, **kwargs)

    monkeypatch.setattr(cache, "load_image", counting)  # forked workers inherit the patched module
    return lambda: sorted(log.read_text().split())


def test_a_second_build_decodes_nothing(photos, tmp_path, decoded):
    names = [f"p{i}.png" for i in range(4)]
    first = build_cache(photos, names, tmp_path / "cache", (16, 32), workers=2)
    assert decoded() == names
    data_file = next((tmp_path / "cache").glob("*.u8"))
    written = data_file.stat().st_mtime_ns
    again = build_cache(photos, names, tmp_path / "cache", (16, 32), workers=2)
    assert decoded() == names and data_file.stat().st_mtime_ns == written  # nothing decoded, nothing rewritten
    assert all(np.array_equal(first[n], again[n]) for n in names)
    assert np.array_equal(again["p3.png"], load_image(photos / "p3.png", (16, 32)))


def test_only_changed_photos_and_boxes_are_decoded_again(photos, tmp_path, decoded):
    names = [f"p{i}.png" for i in range(4)]
    boxes = {n: (0.0, 0.0, 30.0, 30.0) for n in names}
    build_cache(photos, names, tmp_path / "cache", (16, 32), boxes=boxes, workers=2)
    Image.fromarray(np.full((30, 60, 3), 250, np.uint8)).save(photos / "p1.png")  # a new photo under an old name
    os.utime(photos / "p1.png", ns=(1, 1))
    boxes["p2.png"] = (10.0, 5.0, 50.0, 25.0)  # a new box
    images = build_cache(photos, names, tmp_path / "cache", (16, 32), boxes=boxes, workers=2)
    assert decoded() == sorted(names + ["p1.png", "p2.png"])
    assert images["p1.png"].min() > 240  # the new pixels, not the cached ones
    assert np.array_equal(images["p2.png"], load_image(photos / "p2.png", (16, 32), boxes["p2.png"]))
    assert np.array_equal(images["p3.png"], load_image(photos / "p3.png", (16, 32), boxes["p3.png"]))


def test_unreadable_photos_are_listed_and_sizes_have_their_own_cache(photos, tmp_path):
    (photos / "broken.png").write_bytes(b"not a png")
    names = ["p0.png", "broken.png"]
    images = build_cache(photos, names, tmp_path / "cache", (16, 32), workers=1)
    assert set(images.problems) == {"broken.png"} and images.problems["broken.png"].startswith("unreadable")
    assert images["broken.png"].max() == 0  # a black row
    other = build_cache(photos, names, tmp_path / "cache", (8, 16), workers=1)
    assert other["p0.png"].shape == (8, 16, 3) and images["p0.png"].shape == (16, 32, 3)
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 2
