"""Shared fixtures: a tiny synthetic dataset and tiny trained models, made once per test session.

Tests that train a model, or use one of the trained fixtures, are marked `slow`; browser tests are
marked `browser`. The fast loop is `python3 -m pytest -m "not slow"`; the whole suite runs in two
processes (`-n 2`), each of which makes these fixtures for itself.
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Parallel workers (pytest -n N) share the cores: each gets its share of threads, its subprocesses
    # too, since torch's default of one thread per core in every worker oversubscribes them (a fit
    # beside a fit ran 6x slower on 2 cores). Set before torch loads, which reads it then.
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import re
import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from whalefast.core.ranking import map5_labels
from whalefast.data.synth import SynthConfig, generate
from whalefast.learn.trainer import fit
from whalefast.runs.config import FitConfig
from whalefast.runs.folder import Run
from whalefast.stages.prepare import PrepareConfig, prepare

TINY = SynthConfig(seed=1, whales=10, train_images=150, test_images=40)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny synthetic dataset prepared with its fluke boxes (read-only by convention; copy it to change it)."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(out, TINY, workers=2)
    prepare(out, cfg=PrepareConfig(valid_pct=0.3, seed=0, boxes=str(out / "boxes.csv")), quiet=True)
    return out


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny dataset without prepare's outputs."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_data, dst, ignore=shutil.ignore_patterns("prepared"))
    return dst


TRAINED = {"tiny_softmax", "tiny_arcface", "tiny_ensemble", "arc_run"}  # fixtures that fit a model (or copy one that was)


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINED & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _baseline_map5(data: Path) -> float:
    """Validation MAP@5 of ranking "new_whale, then the 4 most frequent training ids" for every photo."""
    split = pd.read_csv(data / "prepared" / "split.csv", keep_default_na=False)
    valid = split[split.is_valid]
    counts = split[~split.is_valid & (split.Id != "new_whale")].Id.value_counts()
    ranking = ["new_whale"] + counts.index[:4].tolist()
    return map5_labels([ranking] * len(valid), valid.target.tolist())


@pytest.fixture(scope="session")
def baseline_map5():
    """baseline_map5(data): validation MAP@5 of ranking "new_whale, then the 4 most frequent training ids" for every photo."""
    return _baseline_map5


def _tiny_fit_config(data: Path, models: Path, **kw) -> FitConfig:
    """Settings for a fit that takes seconds on 2 CPU cores and still learns."""
    base = dict(
        data=str(data),
        arch="efficientnet-lite0",
        pretrained=True,
        size=(48, 96),
        bs=32,
        epochs=6,
        lr=1e-3,
        milestones=(5,),
        schedule="step",
        opt="adam",
        min_samples=4,
        name="tiny",
        models_dir=str(models),
        seed=0,
    )
    base.update(kw)
    return FitConfig(**base)


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config(data, models, **settings): a FitConfig for a fit that takes seconds on 2 CPU cores and still learns."""
    return _tiny_fit_config


@pytest.fixture(scope="session")
def fast_fit_args():
    """Command-line options for a fit of seconds: the reference's small ResNet at 32 px, from scratch, 2 epochs (options typed after them win)."""
    return [
        "--arch",
        "whale-resnet",
        "--no-pretrained",
        "--size",
        "32",
        "--bs",
        "16",
        "--lr",
        "0.02",
        "--epochs",
        "2",
        "--milestones",
        "1",
        "--min-samples",
        "2",
    ]


@pytest.fixture(scope="session")
def catalogue_of():
    """catalogue_of(run_dir): the saved catalogue of an arcface run."""
    return lambda run_dir: Run.open(run_dir).catalogue()


def _copy_run(source: Path, target: Path) -> Path:
    """A copy of the run folder `source` at `target`, with its models folder's catalogue database (copied by SQLite's backup)."""
    shutil.copytree(source, target)
    database = source.parent / "catalogue.db"
    if database.is_file():
        with sqlite3.connect(database) as src, sqlite3.connect(target.parent / "catalogue.db") as dst:
            src.backup(dst)
    return target


@pytest.fixture(scope="session")
def copy_run():
    """copy_run(source, target): a private copy of a run folder and its catalogue database, to change."""
    return _copy_run


@pytest.fixture(scope="session")
def review_log():
    """review_log(run_dir): the review decisions of a run, as its review log lists them (read from the catalogue database)."""

    def read(run_dir: Path) -> pd.DataFrame:
        from whalefast.review.logic import LOG_COLUMNS

        database = Path(run_dir).parent / "catalogue.db"
        if not database.is_file():
            return pd.DataFrame(columns=LOG_COLUMNS)
        with sqlite3.connect(database) as db:
            rows = pd.read_sql("SELECT * FROM decisions ORDER BY id", db)
        return rows.drop(columns="id").rename(columns={"individual": "id"})[LOG_COLUMNS]

    return read


@pytest.fixture
def arc_run(tiny_arcface, tmp_path):
    """A private copy of the tiny arcface run, in tmp_path/models/arcface (reviews and additions change its catalogue)."""
    return _copy_run(tiny_arcface[0], tmp_path / "models" / "arcface")


@pytest.fixture(scope="session")
def tiny_softmax(tiny_data, tmp_path_factory):
    """A tiny softmax model fitted on the tiny dataset: (run dir, fit result)."""
    models = tmp_path_factory.mktemp("models")
    result = fit(_tiny_fit_config(tiny_data, models, name="softmax"))
    Run.open(models / "softmax").onnx_network()  # exported once here, so the copies tests make of the run carry model.onnx
    return models / "softmax", result


@pytest.fixture(scope="session")
def tiny_arcface(tiny_data, tmp_path_factory):
    """A tiny arcface model fitted on the tiny dataset: (run dir, fit result)."""
    models = tmp_path_factory.mktemp("models")
    result = fit(_tiny_fit_config(tiny_data, models, name="arcface", method="arcface", embed_dim=64, scale=16.0, map_every=4))
    Run.open(models / "arcface").onnx_network()
    return models / "arcface", result


class ReviewBrowser:
    """A review app reached as a browser tab on this machine reaches it: its own Host and Origin, each form's CSRF token."""

    ORIGIN = "http://127.0.0.1:8000"

    def __init__(self, app):
        from fastapi.testclient import TestClient

        self.app = app
        self.client = TestClient(app, base_url=self.ORIGIN)

    @property
    def review(self):
        return self.app.state.review

    def get(self, url: str, **kwargs):
        return self.client.get(url, **kwargs)

    def token(self, page: str = "/") -> str:
        """The CSRF token in the forms of `page`."""
        return re.search(r'name="csrf" value="([0-9a-f]+)"', self.client.get(page).text).group(1)

    def post(self, url: str, data: dict | None = None, files=None, page: str = "/", **kwargs):
        """Submit a form of `page` as the page's own script or button would."""
        data = {"csrf": self.token(page), **(data or {})}
        return self.client.post(url, data=data, files=files, headers={"Origin": self.ORIGIN}, **kwargs)


@pytest.fixture
def review_browser():
    """Open the review app of a run: review_browser(run_dir, **create_app options) -> ReviewBrowser."""
    from whalefast.review.app import create_app

    return lambda run_dir, **kwargs: ReviewBrowser(create_app(run_dir, **kwargs))
