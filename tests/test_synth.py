import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from whalefast.cli import app
from whalefast.data.synth import SynthConfig, generate, photos_per_id


def test_layout_and_counts(tiny_data):
    for name in ("train.csv", "train", "test", "sample_submission.csv", "test_answers.csv"):
        assert (tiny_data / name).exists()
    train = pd.read_csv(tiny_data / "train.csv")
    answers = pd.read_csv(tiny_data / "test_answers.csv")
    assert list(train.columns) == ["Image", "Id"] and len(train) == 150
    assert sorted(os.listdir(tiny_data / "train")) == sorted(train.Image)
    assert sorted(os.listdir(tiny_data / "test")) == sorted(answers.Image) and len(answers) == 40
    sample = pd.read_csv(tiny_data / "sample_submission.csv")
    assert list(sample.Image) == list(answers.Image)
    assert all(len(ids.split()) == 5 for ids in sample.Id)


def test_shares_and_answers(tiny_data):
    train = pd.read_csv(tiny_data / "train.csv")
    answers = pd.read_csv(tiny_data / "test_answers.csv")
    assert 0.05 <= (train.Id == "new_whale").mean() <= 0.2
    assert 0.2 <= (answers.Id == "new_whale").mean() <= 0.4
    assert set(answers.Id) <= set(train.Id) | {"new_whale"}
    modes = [Image.open(tiny_data / "train" / n).mode for n in train.Image]
    assert 0.15 <= modes.count("L") / len(modes) <= 0.5
    widths = [Image.open(tiny_data / "train" / n).width for n in train.Image]
    assert min(widths) >= 150 and max(widths) <= 1100 and max(widths) - min(widths) > 300


def test_long_tail_like_real_data():
    counts = photos_per_id(300, 2100, np.random.default_rng(0))
    assert counts.sum() == 2100 and counts.min() >= 1
    assert (counts <= 2).mean() >= 0.4  # most ids have one or two photos
    assert (counts >= 20).sum() >= 3  # a few have twenty or more


def test_planted_duplicates_include_conflicting_labels():
    cfg = SynthConfig(seed=3, whales=30, train_images=400, test_images=20)
    from whalefast.data.synth import plan_dataset

    plan = plan_dataset(cfg)
    labels = {p.name: lab for p, lab in plan["train"]}
    dups = plan["duplicates"]
    assert abs(len(dups) / 400 - 0.08) < 0.01
    kinds = {("same" if lab == labels[orig] else "new_whale" if lab == "new_whale" else "other") for _, orig, lab, _ in dups}
    assert {"same", "new_whale", "other"} <= kinds
    assert len(plan["test_duplicates"]) >= 1


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    cfg = SynthConfig(seed=5, whales=4, train_images=25, test_images=8)
    generate(tmp_path / "a", cfg, workers=1)
    generate(tmp_path / "b", cfg, workers=2)
    generate(tmp_path / "c", SynthConfig(seed=6, whales=4, train_images=25, test_images=8), workers=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_bad_out_is_one_line_error(tmp_path):
    runner = CliRunner()
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = runner.invoke(app, ["synth", "--out", str(afile)])
    assert result.exit_code == 1
    assert "not a folder" in result.output and "Traceback" not in result.output
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    # As root, permissions do not stop writes: drop CAP_DAC_OVERRIDE for the command (util-linux's setpriv).
    as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    if as_user and shutil.which("setpriv") is None:
        pytest.skip("root can write anywhere without setpriv")
    try:
        result = subprocess.run([*as_user, sys.executable, "-m", "whalefast", "synth", "--out", str(locked / "sub")], capture_output=True, text=True)
        assert result.returncode == 1 and "cannot create" in result.stderr and "Traceback" not in result.stderr, result.stderr
    finally:
        locked.chmod(0o700)


def test_unwritable_out_under_root(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "not writable" in result.output
