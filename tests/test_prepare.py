import hashlib
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from whalefast.cli import app
from whalefast.core.errors import WhalefastError
from whalefast.core.images import open_rgb
from whalefast.stages.prepare import prepare


def _tree_digest(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = (hashlib.sha256(open(p, "rb").read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def test_finds_planted_duplicates_and_leaves_inputs_untouched(data_copy, tmp_path):
    before = _tree_digest(data_copy)
    summary = prepare(data_copy, out=tmp_path / "prep", quiet=True)
    assert _tree_digest(data_copy) == before
    planted = pd.read_csv(data_copy / "planted_duplicates.csv")
    groups = pd.read_csv(tmp_path / "prep" / "dedup.csv")
    together = {frozenset(g.split()) for g in groups.images}
    exact = planted[(planted.Split == "train") & (planted.Kind == "exact")]
    assert len(exact) > 0
    for copy, original in zip(exact.Image, exact.Original):
        assert any({copy, original} <= g for g in together), (copy, original)
    found = sum(any({c, o} <= g for g in together) for c, o in zip(planted.Image, planted.Original) if c in set(pd.read_csv(data_copy / "train.csv").Image))
    assert found >= 0.8 * (planted.Split == "train").sum()
    matched = set(pd.read_csv(tmp_path / "prep" / "test_matches.csv").Image)
    assert set(planted[(planted.Split == "test") & (planted.Kind == "exact")].Image) <= matched
    for name in ("hashes.csv", "dedup.csv", "train_clean.csv", "test_matches.csv", "split.csv", "skipped.csv"):
        assert (tmp_path / "prep" / name).is_file()
    assert summary["images_after"] < summary["images_before"]


def _add(data, name, image_id, writer):
    writer(data / "train" / name)
    labels = pd.read_csv(data / "train.csv")
    pd.concat([labels, pd.DataFrame({"Image": [name], "Id": [image_id]})]).to_csv(data / "train.csv", index=False)


def test_odd_images_are_read_and_bad_ones_skipped(data_copy):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 80, 3), dtype=np.uint8))
    _add(data_copy, "cmyk.jpg", "w_cmyk", lambda p: rgb.convert("CMYK").save(p))
    _add(data_copy, "palette.png", "w_pal", lambda p: rgb.convert("P").save(p))
    _add(data_copy, "sixteen.png", "w_16", lambda p: Image.fromarray((np.arange(3200).reshape(40, 80) * 20).astype(np.uint16)).save(p))

    def rotated(p):
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90°
        rgb.save(p, exif=exif)

    _add(data_copy, "exif.jpg", "w_exif", rotated)

    def truncated(p):
        rgb.save(p)
        p.write_bytes(p.read_bytes()[:200])

    _add(data_copy, "truncated.jpg", "w_trunc", truncated)
    _add(data_copy, "notanimage.jpg", "w_text", lambda p: p.write_text("hello"))
    labels = pd.read_csv(data_copy / "train.csv")
    pd.concat([labels, pd.DataFrame({"Image": ["gone.jpg"], "Id": ["w_gone"]})]).to_csv(data_copy / "train.csv", index=False)

    summary = prepare(data_copy, quiet=True)
    skipped = pd.read_csv(data_copy / "prepared" / "skipped.csv")
    assert set(skipped.Image) == {"truncated.jpg", "notanimage.jpg", "gone.jpg"}
    assert skipped.set_index("Image").problem["gone.jpg"] == "missing"
    assert summary["skipped"] == 3
    hashes = pd.read_csv(data_copy / "prepared" / "hashes.csv", keep_default_na=False).set_index("Image")
    assert hashes.loc["cmyk.jpg", "mode"] == "CMYK" and hashes.loc["palette.png", "mode"] == "P"
    assert hashes.loc["sixteen.png", "problem"] == ""
    assert (hashes.loc["exif.jpg", "width"], hashes.loc["exif.jpg", "height"]) == (40, 80)  # orientation honoured
    assert open_rgb(data_copy / "train" / "sixteen.png").mode == "RGB"


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "train.csv").unlink(), "train.csv: not found"),
        (lambda d: (d / "train.csv").write_text("Image,Whale\na.jpg,w_1\n"), "expected columns Image,Id"),
        (lambda d: (d / "train.csv").write_text("Image,Id\na.jpg,\n"), "empty Id on line 2"),
        (lambda d: (d / "train.csv").write_text("Image,Id\na.jpg,w_1\na.jpg,w_2\n"), "listed twice"),
        (lambda d: (d / "train.csv").write_bytes(b"\xff\xfe\x00bad"), "train.csv"),
        (lambda d: os.rename(d / "test", d / "tst"), "test: not found"),
    ],
)
def test_fatal_input_problems_are_one_line_errors(data_copy, breakage, message):
    breakage(data_copy)
    with pytest.raises(WhalefastError, match=message.replace(".", r"\.")):
        prepare(data_copy, quiet=True)
    result = CliRunner().invoke(app, ["prepare", "--data", str(data_copy)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
