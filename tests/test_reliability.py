"""What a newcomer's trial found (issue 12): each case here failed before its fix."""

import json
import os
import shutil

import pandas as pd
import pytest
import torch
from conftest import tiny_fit_config
from typer.testing import CliRunner

from whalefast.catalogue import add_to_catalogue, load_catalogue
from whalefast.errors import WhalefastError
from whalefast.io import to_json, write_csv
from whalefast.predict import example_photos, predict
from whalefast.train import fit

runner = CliRunner()


def _fast(tiny_data, models, **kw):
    """A fit of seconds: the small reference ResNet at 32 px."""
    base = dict(arch="whale-resnet", pretrained=False, size=32, bs=16, epochs=2, milestones=(1,), opt="sgd", lr=0.02)
    return tiny_fit_config(tiny_data, models, **{**base, **kw})


def test_diverging_fit_stops_with_one_line_and_leaves_nothing(tiny_data, tmp_path):
    with pytest.raises(WhalefastError, match=r"diverged in epoch 0.*lower --lr \(this run used 1e\+06\)"):
        fit(_fast(tiny_data, tmp_path, lr=1e6, momentum=0.99))
    assert not (tmp_path / "tiny").exists()  # a run that failed before its first epoch ended leaves no folder
    result = runner.invoke(
        app_cli(),
        [
            "fit",
            "--data",
            str(tiny_data),
            "--arch",
            "whale-resnet",
            "--no-pretrained",
            "--size",
            "32",
            "--bs",
            "16",
            "--epochs",
            "1",
            "--lr",
            "1e6",
            "--models-dir",
            str(tmp_path),
            "--name",
            "x",
        ],
    )
    assert result.exit_code == 1 and "diverged in epoch 0" in result.output and "Traceback" not in result.output


def app_cli():
    from whalefast.cli import app

    return app


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--milestones", "a,b"], "--milestones must be comma-separated epoch numbers"),
        (["--size", "0"], "--size must be at least 16"),
        (["--size", "12x"], "--size must be N or HEIGHTxWIDTH"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--bs", "0"], "--bs must be at least 1"),
        (["--map-every", "0"], "--map-every must be at least 1"),
        (["--opt", "rmsprop"], "--opt must be sgd or adam"),
    ],
)
def test_each_bad_option_is_one_line_naming_it(tmp_path, args, message):
    result = runner.invoke(app_cli(), ["fit", "--data", str(tmp_path), "--arch", "whale-resnet", "--no-pretrained", *args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


def test_json_is_always_valid():
    text = to_json({"threshold": float("nan"), "scores": [1.0, float("inf"), -float("inf")]})
    assert json.loads(text) == {"threshold": None, "scores": [1.0, None, None]}


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_csv(pd.DataFrame({"a": [1]}), tmp_path / "shared.csv")
        os.umask(0o077)
        write_csv(pd.DataFrame({"a": [1]}), tmp_path / "private.csv")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.csv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.csv").stat().st_mode & 0o777 == 0o600


def _new_photos(tmp_path, tiny_data, n=2):
    folder = tmp_path / "new"
    folder.mkdir()
    names = pd.read_csv(tiny_data / "test_answers.csv").Image[:n]
    for name in names:
        shutil.copy(tiny_data / "test" / name, folder / name)
    return folder, list(names)


def test_catalogue_add_is_idempotent_and_relabels_explicitly(tiny_arcface, tiny_data, tmp_path):
    run_dir = tmp_path / "arcface"
    shutil.copytree(tiny_arcface[0], run_dir)
    folder, names = _new_photos(tmp_path, tiny_data)
    write_csv(pd.DataFrame({"Image": names, "Id": ["w_one", "w_two"]}), tmp_path / "new.csv")
    size = load_catalogue(run_dir)["embeddings"].shape[0]
    first = add_to_catalogue(run_dir, tmp_path / "new.csv", folder)
    assert (first["added_photos"], first["unchanged_photos"], first["new_ids"]) == (2, 0, 2)
    second = add_to_catalogue(run_dir, tmp_path / "new.csv", folder)
    assert (second["added_photos"], second["unchanged_photos"], second["new_ids"]) == (0, 2, 0)
    assert load_catalogue(run_dir)["embeddings"].shape[0] == size + 2

    write_csv(pd.DataFrame({"Image": [names[0]], "Id": ["w_two"]}), tmp_path / "relabel.csv")
    with pytest.raises(WhalefastError, match=f"{names[0]} is already catalogued as w_one, not w_two.*--relabel"):
        add_to_catalogue(run_dir, tmp_path / "relabel.csv", folder)
    result = runner.invoke(
        app_cli(),
        ["catalogue", "add", "--model", "arcface", "--models-dir", str(tmp_path), "--csv", str(tmp_path / "relabel.csv"), "--images", str(folder), "--relabel"],
    )
    assert result.exit_code == 0, result.output
    assert f"relabelled {folder / names[0]}: w_one -> w_two" in result.stdout
    cat = load_catalogue(run_dir)
    assert cat["embeddings"].shape[0] == size + 2
    labels = [cat["ids"][i] for i in cat["labels"].tolist()]
    assert labels[-2:] == ["w_two", "w_two"]
    # The review sheet finds photos added by `catalogue add`: the catalogue remembers where each lives.
    assert example_photos(run_dir)["w_two"] == (folder / names[0]).resolve()


def test_catalogue_and_resume_state_load_without_running_code(tiny_arcface):
    run_dir = tiny_arcface[0]
    torch.load(run_dir / "catalogue.pt", weights_only=True)
    state = torch.load(run_dir / "last.pth", weights_only=True)
    assert {"model", "opt", "epoch", "best_loss", "best_epoch"} <= set(state)


def test_damaged_saved_files_give_one_line_errors_naming_them(tiny_arcface, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_arcface[0], run_dir)
    for name in ("model.pth", "catalogue.pt", "last.pth"):
        (run_dir / name).write_bytes((run_dir / name).read_bytes()[:1000])  # cut short, as by a full disk
    result = runner.invoke(app_cli(), ["submit", "--data", str(tiny_data), "--model", "run", "--models-dir", str(tmp_path), "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 1 and "model.pth: not a whalefast model, or damaged" in result.output and "Traceback" not in result.output
    with pytest.raises(WhalefastError, match="catalogue.pt: not a whalefast catalogue, or damaged"):
        load_catalogue(run_dir)
    with pytest.raises(WhalefastError, match="last.pth: not a whalefast resume state, or damaged"):
        fit(tiny_fit_config(tiny_data, tmp_path, name="run"), resume=True)
    assert not (tmp_path / "s.csv").exists()


def test_predict_takes_folders_and_skips_unreadable_photos(tiny_softmax, tiny_data, tmp_path):
    run_dir, _ = tiny_softmax
    folder, names = _new_photos(tmp_path, tiny_data, n=3)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    results = predict([folder], run_dir, top=3)
    assert [os.path.basename(r["image"]) for r in results] == sorted(names + ["broken.jpg"])
    broken = [r for r in results if r["image"].endswith("broken.jpg")]
    assert broken[0]["error"].startswith("unreadable image") and "matches" not in broken[0]
    assert sum("matches" in r for r in results) == 3

    result = runner.invoke(app_cli(), ["predict", str(folder), "--model", run_dir.name, "--models-dir", str(run_dir.parent), "--json"])
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.stdout)  # results alone on stdout, strict JSON
    assert len(parsed) == 4 and "skipped" in result.stderr and "broken.jpg" in result.stderr

    tables = runner.invoke(app_cli(), ["predict", str(folder / names[0]), "--model", run_dir.name, "--models-dir", str(run_dir.parent)])
    assert tables.exit_code == 0 and "rank" in tables.stdout and "rank" not in tables.stderr


def test_missing_model_names_the_runs_there(tiny_softmax):
    run_dir, _ = tiny_softmax
    result = runner.invoke(app_cli(), ["catalogue", "show", "--model", "nosuch", "--models-dir", str(run_dir.parent)])
    assert result.exit_code == 1
    assert "nosuch: no such model" in result.output and run_dir.name in result.output
    shown = runner.invoke(app_cli(), ["catalogue", "show", "--model", run_dir.name, "--models-dir", str(run_dir.parent)])
    assert shown.exit_code == 1 and "softmax model has no catalogue" in shown.output


def test_interrupted_fit_says_how_to_continue_and_resume_refuses_other_options(tiny_data, tmp_path, monkeypatch):
    from whalefast import train

    args = [
        "fit",
        "--data",
        str(tiny_data),
        "--arch",
        "whale-resnet",
        "--no-pretrained",
        "--size",
        "32",
        "--bs",
        "16",
        "--epochs",
        "2",
        "--milestones",
        "1",
        "--lr",
        "0.02",
        "--models-dir",
        str(tmp_path),
        "--name",
        "run",
        "--min-samples",
        "2",
    ]
    original = train.Checkpoints.after_epoch

    def interrupt(self):
        original(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Checkpoints, "after_epoch", interrupt)
    result = runner.invoke(app_cli(), args)
    assert result.exit_code == 130
    assert f"whalefast fit --name run --models-dir {tmp_path} --resume" in result.output
    monkeypatch.setattr(train.Checkpoints, "after_epoch", original)

    changed = runner.invoke(app_cli(), ["fit", "--name", "run", "--models-dir", str(tmp_path), "--resume", "--lr", "0.5"])
    assert changed.exit_code == 1 and "--lr 0.5 (the run has 0.02)" in changed.output
    resumed = runner.invoke(app_cli(), ["fit", "--name", "run", "--models-dir", str(tmp_path), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert pd.read_csv(tmp_path / "run" / "history.csv").epoch.tolist() == [0, 1]


def test_help_shows_defaults_and_whole_arch_names():
    from whalefast.models import ARCHS

    result = runner.invoke(app_cli(), ["fit", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    text = " ".join(result.output.replace("│", " ").split())
    assert " ." not in text
    assert "[default: (prepare's --min-samples)]" in text and "[default: (the recipe, or the arch for reference)]" in text
    for name in ARCHS:
        assert name in text


def test_quiet_epoch_lines_when_not_a_terminal(tiny_data, tmp_path):
    result = runner.invoke(
        app_cli(),
        [
            "fit",
            "--data",
            str(tiny_data),
            "--arch",
            "whale-resnet",
            "--no-pretrained",
            "--size",
            "32",
            "--bs",
            "16",
            "--epochs",
            "2",
            "--milestones",
            "1",
            "--lr",
            "0.02",
            "--models-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    epoch_lines = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and "train_loss" in epoch_lines[0]
    assert "\r" not in result.output and len(result.output) < 4000
