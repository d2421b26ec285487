"""The predict stage: ranked ids for photos and folders, JSON on stdout, a review sheet, unreadable photos listed."""

import json
import os
import shutil

import pandas as pd
from typer.testing import CliRunner

from whalefast.cli import app
from whalefast.stages.predict import predict

runner = CliRunner()


def test_predict_takes_folders_and_skips_unreadable_photos(tiny_softmax, tiny_data, tmp_path):
    run_dir, _ = tiny_softmax
    folder = tmp_path / "new"
    folder.mkdir()
    names = list(pd.read_csv(tiny_data / "test_answers.csv").Image[:3])
    for name in names:
        shutil.copy(tiny_data / "test" / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    results = predict([folder], run_dir, top=3)
    assert [os.path.basename(r["image"]) for r in results] == sorted(names + ["broken.jpg"])
    broken = [r for r in results if r["image"].endswith("broken.jpg")]
    assert broken[0]["error"].startswith("unreadable image") and "matches" not in broken[0]
    assert sum("matches" in r for r in results) == 3

    result = runner.invoke(app, ["predict", str(folder), "--model", run_dir.name, "--models-dir", str(run_dir.parent), "--json"])
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.stdout)  # results alone on stdout, strict JSON
    assert len(parsed) == 4 and "skipped" in result.stderr and "broken.jpg" in result.stderr

    tables = runner.invoke(app, ["predict", str(folder / names[0]), "--model", run_dir.name, "--models-dir", str(run_dir.parent)])
    assert tables.exit_code == 0 and "rank" in tables.stdout and "rank" not in tables.stderr


def test_predict_json_and_sheet(tiny_softmax, tiny_data, tmp_path):
    run_dir, _ = tiny_softmax
    photos = sorted((tiny_data / "test").iterdir())[:2]
    options = ["--model", run_dir.name, "--models-dir", str(run_dir.parent), "--json", "--top", "3", "--sheet", str(tmp_path / "sheet.png")]
    result = runner.invoke(app, ["predict", *map(str, photos), *options])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[: result.stdout.rindex("]") + 1])
    assert [d["image"] for d in data] == list(map(str, photos))
    assert all(len(d["matches"]) == 3 and len({m["id"] for m in d["matches"]}) == 3 for d in data)
    assert (tmp_path / "sheet.png").read_bytes()[:4] == b"\x89PNG"
