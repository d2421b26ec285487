import numpy as np
import pandas as pd
from PIL import Image

from whalefast.data.dedup import decide_group, dedup, hash_images, match_test


def _photo(seed: int, size=(120, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)).resize(size, Image.NEAREST)


def _hashed(folder, rows):
    """Save each (name, seed, id) photo in `folder`, hash them, and return the frame dedup expects."""
    for name, seed, _ in rows:
        _photo(seed).save(folder / name)
    labels = pd.DataFrame([(n, i) for n, _, i in rows], columns=["Image", "Id"])
    return labels.merge(hash_images(folder, labels.Image.tolist(), workers=1), on="Image")


def test_each_dedup_rule(tmp_path):
    rows = [
        ("a1.jpg", 1, "w_a"),
        ("a2.jpg", 1, "w_a"),  # one id: keep one
        ("b1.png", 2, "w_b"),
        ("b2.png", 2, "new_whale"),  # new_whale + one id: drop new_whale
        ("c1.png", 3, "w_c"),
        ("c2.png", 3, "w_d"),  # two ids: drop the group
        ("d1.png", 4, "new_whale"),
        ("d2.png", 4, "new_whale"),  # new_whale only: keep one
        ("e1.png", 5, "w_e"),  # no duplicate: untouched
    ]
    clean, groups = dedup(_hashed(tmp_path, rows))
    actions = dict(zip(groups.images.str.split().str[0], groups.action))
    assert actions == {"a1.jpg": "keep_one", "b1.png": "drop_new_whale", "c1.png": "drop_all", "d1.png": "keep_one"}
    kept = set(clean.Image)
    assert len(kept & {"a1.jpg", "a2.jpg"}) == 1
    assert "b1.png" in kept and "b2.png" not in kept
    assert not kept & {"c1.png", "c2.png"}
    assert len(kept & {"d1.png", "d2.png"}) == 1 and "e1.png" in kept


def test_decide_group():
    assert decide_group(["w_a", "w_a"]) == "keep_one"
    assert decide_group(["w_a", "new_whale", "w_a"]) == "drop_new_whale"
    assert decide_group(["w_a", "w_b", "new_whale"]) == "drop_all"


def test_near_duplicates_merge_only_within_max_distance(tmp_path):
    _photo(7).save(tmp_path / "x.png")
    im = np.asarray(_photo(7)).copy()
    im[:20, :30] = 255  # a visible change: a near, not exact, duplicate
    Image.fromarray(im).save(tmp_path / "y.png")
    h = hash_images(tmp_path, ["x.png", "y.png"], workers=1)
    frame = pd.DataFrame({"Image": ["x.png", "y.png"], "Id": ["w_a", "w_a"]}).merge(h, on="Image")
    distance = bin(int(h.hash[0], 16) ^ int(h.hash[1], 16)).count("1")
    assert distance > 0
    assert len(dedup(frame, max_distance=0)[0]) == 2
    assert len(dedup(frame, max_distance=distance)[0]) == 1


def test_hash_cache_reuses_unchanged_files_only(tmp_path):
    _photo(1).save(tmp_path / "a.png")
    _photo(2).save(tmp_path / "b.png")
    first = hash_images(tmp_path, ["a.png", "b.png"], workers=1)
    fake = first.copy()
    fake.loc[:, "hash"] = "0123456789abcdef"
    again = hash_images(tmp_path, ["a.png", "b.png"], cache=fake, workers=1)
    assert list(again.hash) == ["0123456789abcdef"] * 2  # served from the cache, not recomputed
    _photo(3).save(tmp_path / "b.png")  # changed file: new size/mtime
    again = hash_images(tmp_path, ["a.png", "b.png"], cache=fake, workers=1)
    assert again.hash[0] == "0123456789abcdef" and again.hash[1] not in ("0123456789abcdef", first.hash[1])


def test_test_matches_carry_training_ids(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    _photo(1).save(tmp_path / "train" / "t1.png")
    _photo(2).save(tmp_path / "train" / "t2.png")
    _photo(1).save(tmp_path / "test" / "q1.png")
    _photo(9).save(tmp_path / "test" / "q2.png")
    train = pd.DataFrame({"Image": ["t1.png", "t2.png"], "Id": ["w_1", "w_2"]}).merge(hash_images(tmp_path / "train", ["t1.png", "t2.png"], workers=1))
    test = hash_images(tmp_path / "test", ["q1.png", "q2.png"], workers=1)
    m = match_test(test, train)
    assert m[["Image", "TrainImage", "Id", "distance"]].values.tolist() == [["q1.png", "t1.png", "w_1", 0]]
