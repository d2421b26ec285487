"""The catalogue of an arcface run: adding photos (idempotent, explicit relabels), saved files that cannot run code, damaged files."""

import shutil

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from whalefast.cli import app
from whalefast.core.errors import WhalefastError
from whalefast.core.files import write_csv
from whalefast.learn.trainer import fit
from whalefast.match.catalogue import add_to_catalogue
from whalefast.match.matcher import Matcher
from whalefast.stages.predict import example_photos

runner = CliRunner()


def _new_photos(tmp_path, tiny_data, n=2):
    folder = tmp_path / "new"
    folder.mkdir()
    names = pd.read_csv(tiny_data / "test_answers.csv").Image[:n]
    for name in names:
        shutil.copy(tiny_data / "test" / name, folder / name)
    return folder, list(names)


def test_catalogue_add_is_idempotent_and_relabels_explicitly(arc_run, tiny_data, tmp_path, catalogue_of):
    folder, names = _new_photos(tmp_path, tiny_data)
    write_csv(pd.DataFrame({"Image": names, "Id": ["w_one", "w_two"]}), tmp_path / "new.csv")
    size = len(catalogue_of(arc_run))
    first = add_to_catalogue(arc_run, tmp_path / "new.csv", folder)
    assert (first["added_photos"], first["unchanged_photos"], first["new_ids"]) == (2, 0, 2)
    second = add_to_catalogue(arc_run, tmp_path / "new.csv", folder)
    assert (second["added_photos"], second["unchanged_photos"], second["new_ids"]) == (0, 2, 0)
    assert len(catalogue_of(arc_run)) == size + 2

    write_csv(pd.DataFrame({"Image": [names[0]], "Id": ["w_two"]}), tmp_path / "relabel.csv")
    with pytest.raises(WhalefastError, match=f"{names[0]} is already catalogued as w_one, not w_two.*--relabel"):
        add_to_catalogue(arc_run, tmp_path / "relabel.csv", folder)
    models = str(arc_run.parent)
    result = runner.invoke(
        app, ["catalogue", "add", "--model", "arcface", "--models-dir", models, "--csv", str(tmp_path / "relabel.csv"), "--images", str(folder), "--relabel"]
    )
    assert result.exit_code == 0, result.output
    assert f"relabelled {folder / names[0]}: w_one -> w_two" in result.stdout
    cat = catalogue_of(arc_run)
    assert len(cat) == size + 2
    assert [cat.ids[i] for i in cat.labels.tolist()][-2:] == ["w_two", "w_two"]
    # The review sheet finds photos added by `catalogue add`: the catalogue remembers where each lives.
    assert example_photos(Matcher(arc_run))["w_two"] == (folder / names[0]).resolve()


def test_ids_outside_the_rule_are_refused_with_their_line(arc_run, tiny_data, tmp_path):
    folder, names = _new_photos(tmp_path, tiny_data, n=1)
    (tmp_path / "bad.csv").write_text(f"Image,Id\n{names[0]},=HYPERLINK(1)\n")
    with pytest.raises(WhalefastError, match=r"bad.csv: line 2: malformed Id '=HYPERLINK\(1\)' \(an id is letters, digits"):
        add_to_catalogue(arc_run, tmp_path / "bad.csv", folder)


def test_saved_state_loads_without_running_code_and_the_catalogue_is_a_database(tiny_arcface):
    import sqlite3

    run_dir = tiny_arcface[0]
    assert not (run_dir / "catalogue.pt").exists()
    with sqlite3.connect(run_dir.parent / "catalogue.db") as db:
        assert (
            db.execute("PRAGMA journal_mode").fetchone()[0] == "wal" and db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
        )
    state = torch.load(run_dir / "last.pth", weights_only=True)
    assert {"model", "opt", "epoch", "best_loss", "best_epoch"} <= set(state)


def test_damaged_saved_files_give_one_line_errors_naming_them(arc_run, tiny_data, tmp_path, tiny_config, catalogue_of):
    for path in (arc_run / "model.pth", arc_run / "last.pth", arc_run.parent / "catalogue.db"):
        path.write_bytes(path.read_bytes()[:1000])  # cut short, as by a full disk
    models = arc_run.parent
    result = runner.invoke(app, ["submit", "--data", str(tiny_data), "--model", "arcface", "--models-dir", str(models), "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 1 and "model.pth: not a whalefast model, or damaged" in result.output and "Traceback" not in result.output
    with pytest.raises(WhalefastError, match="catalogue.db: not a whalefast catalogue database, or damaged"):
        catalogue_of(arc_run)
    with pytest.raises(WhalefastError, match="last.pth: not a whalefast resume state, or damaged"):
        fit(tiny_config(tiny_data, models, name="arcface"), resume=True)
    assert not (tmp_path / "s.csv").exists()


def test_a_missing_model_names_the_runs_there(tiny_softmax):
    run_dir, _ = tiny_softmax
    result = runner.invoke(app, ["catalogue", "show", "--model", "nosuch", "--models-dir", str(run_dir.parent)])
    assert result.exit_code == 1
    assert "nosuch: no such model" in result.output and run_dir.name in result.output
    shown = runner.invoke(app, ["catalogue", "show", "--model", run_dir.name, "--models-dir", str(run_dir.parent)])
    assert shown.exit_code == 1 and "softmax model has no catalogue" in shown.output


def test_catalogue_show_summarises(tiny_arcface, catalogue_of):
    run_dir, _ = tiny_arcface
    shown = runner.invoke(app, ["catalogue", "show", "--model", run_dir.name, "--models-dir", str(run_dir.parent)])
    cat = catalogue_of(run_dir)
    assert shown.exit_code == 0 and str(len(cat)) in shown.stdout and "embedding_dim" in shown.stdout and "64" in shown.stdout
