"""A run folder (models/NAME/): the only code that knows its file names, and whether the run in it finished.

status.json is written first when training starts ("training") and last when it ends ("finished"):
a fit or boxes fit that is killed, or stopped by a full disk, leaves a folder that commands using a
model refuse with one line saying how to continue, instead of reading a mix of old and new files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

from torch import nn

from whalefast.core.console import console, warn
from whalefast.core.errors import WhalefastError
from whalefast.core.files import file_digest, load_saved, write_bytes, write_json
from whalefast.core.spec import InputSpec
from whalefast.db import CATALOGUE_DB
from whalefast.db.filters import PhotoFilter
from whalefast.db.store import CatalogueStore, PhotoRecord
from whalefast.nets.heads import BoxHead
from whalefast.nets.registry import build_model, get_arch
from whalefast.nets.runtime import OPSET, Bfloat16Network, OnnxNetwork, export_onnx, resolve_runtime
from whalefast.nets.views import Ensemble
from whalefast.runs.catalogue import Catalogue, Projection, load_legacy
from whalefast.runs.config import MEMBERS_DIR, BoxConfig, FitConfig, Learnt, legacy_input_spec, member_config
from whalefast.runs.methods import Method, get_method

WHALES, BOXES = "whales", "boxes"
TRAINING, FINISHED = "training", "finished"


class Run:
    """The folder of one training run (a whale model or a box model), loaded lazily and at most once per command."""

    CONFIG, LEARNT, INPUT, STATUS = "config.json", "learnt.json", "input.json", "status.json"
    WEIGHTS, RESUME, CATALOGUE, CALIBRATION = "model.pth", "last.pth", "catalogue.pt", "calibration.json"
    HISTORY, CURVES, LR_FIND, BOX_METRICS = "history.csv", "curves.png", "lr_find.png", "metrics.json"
    PROJECTION, ONNX = "projection.pt", "model.onnx"
    LAST_WRITTEN = {WHALES: CALIBRATION, BOXES: BOX_METRICS}  # what a run from before status.json wrote last

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def open(cls, path: str | os.PathLike, kind: str | None = WHALES, finished: bool = True) -> Run:
        """The run in `path` (of `kind`, or any kind for None), or a one-line error: no such folder (naming the runs beside it), another kind of model, or (with `finished`) a run that did not finish."""
        run = cls(path)
        if not run.path.is_dir():
            parent = run.path.parent
            runs = sorted(p.name for p in parent.iterdir() if (p / cls.CONFIG).is_file()) if parent.is_dir() else []
            found = f"runs in {parent}: {', '.join(runs)}" if runs else f"no runs in {parent}"
            raise WhalefastError(f"{run.path}: no such model ({found})")
        if not (run / cls.CONFIG).is_file():
            raise WhalefastError(f"{run.path}: {run.unfinished_text()}")
        if kind is not None and run.kind != kind:
            noun = "a box model (train one with `whalefast boxes fit`)" if kind == BOXES else "a whale model"
            raise WhalefastError(f"{run.path}: a {run.kind} model, not {noun}")
        if finished and not run.is_finished():
            raise WhalefastError(f"{run.path}: {run.unfinished_text()}")
        return run

    # What the folder holds

    @cached_property
    def raw_config(self) -> dict:
        try:
            return json.loads((self / self.CONFIG).read_text())
        except (OSError, ValueError):
            raise WhalefastError(f"{self / self.CONFIG}: not a whalefast run configuration, or damaged") from None

    @property
    def kind(self) -> str:
        return self.raw_config.get("kind", WHALES)

    @cached_property
    def settings(self) -> FitConfig | BoxConfig:
        """What the user chose (config.json)."""
        config = BoxConfig if self.kind == BOXES else FitConfig
        return config(**{k: v for k, v in self.raw_config.items() if k in config.__dataclass_fields__})

    @cached_property
    def learnt(self) -> Learnt:
        """What the run learnt from its data (learnt.json; config.json in runs from before it)."""
        path = self / self.LEARNT
        raw = json.loads(path.read_text()) if path.is_file() else self.raw_config
        return Learnt(**{k: v for k, v in raw.items() if k in Learnt.__dataclass_fields__})

    @cached_property
    def spec(self) -> InputSpec:
        """What a photo becomes before the network sees it (input.json; resolved from config.json in runs from before it)."""
        if self.kind == BOXES:
            return self.settings.spec
        path = self / self.INPUT
        return InputSpec.from_json(json.loads(path.read_text())) if path.is_file() else legacy_input_spec(self.raw_config)

    @cached_property
    def method(self) -> Method:
        return get_method(self.settings.method)

    @cached_property
    def calibration(self) -> dict:
        path = self / self.CALIBRATION
        return json.loads(path.read_text()) if path.is_file() else {"threshold": None}

    @property
    def threshold(self) -> float | None:
        return self.calibration.get("threshold")

    def network(self) -> nn.Module:
        """The trained network (an ensemble's members combined; a box model's regressor), with its best weights, in eval mode on the CPU."""
        weights = self / self.WEIGHTS
        if not weights.is_file():
            command = "boxes fit" if self.kind == BOXES else "fit"
            raise WhalefastError(f"{weights}: not found; did `whalefast {command} --name {self.name}` finish?")
        if self.kind == BOXES:
            network = build_model(self.settings.arch, 4, head=BoxHead(get_arch(self.settings.arch).features))
        else:
            network = whale_network(self.settings, len(self.learnt.vocab))
        try:
            network.load_state_dict(load_saved(weights, "model"))
        except RuntimeError:  # weights of other settings, or a folder missing its learnt.json
            ids = "" if self.kind == BOXES else f" ({len(self.learnt.vocab)} ids)"
            raise WhalefastError(f"{weights}: does not fit the settings in {self / self.CONFIG}{ids}; fit it again") from None
        return network.eval()

    @cached_property
    def weights_digest(self) -> str:
        return file_digest(self / self.WEIGHTS)

    def inference_network(self, runtime: str = "auto", device=None) -> nn.Module:
        """The trained network as inference runs it on `device`: eager PyTorch, with bf16 autocast, or ONNX Runtime on the CPU (see nets.runtime)."""
        import torch

        device = torch.device(device or "cpu")
        runtime = resolve_runtime(runtime, device)
        if runtime == "onnx":
            return self.onnx_network()
        network = self.network().to(device)
        return Bfloat16Network(network).eval() if runtime == "bf16" else network

    def onnx_network(self, export: bool = False) -> OnnxNetwork:
        """The network run by ONNX Runtime from model.onnx; exported from model.pth first where it is missing, from other weights, or `export` says so.

        The export is saved beside the weights; where the folder cannot be written, it serves this
        command only.
        """
        source = f"{self.weights_digest} opset {OPSET}"
        path = self / self.ONNX
        if path.is_file() and not export:
            with contextlib.suppress(WhalefastError):
                network = OnnxNetwork(str(path))
                if network.source == source:
                    return network
        console.print(f"exporting {self.name}'s network for ONNX Runtime (once; --runtime eager runs without it)")
        graph = export_onnx(self.network(), self.spec.size, source)
        try:
            write_bytes(graph, path)
        except WhalefastError as e:
            warn(f"{e}; the exported network serves this command only")
        return OnnxNetwork(graph)

    # The catalogue

    @property
    def catalogue_db(self) -> Path:
        """The catalogue database beside the run folders (models/catalogue.db): the models folder's runs share it."""
        return self.path.parent / CATALOGUE_DB

    @cached_property
    def model_key(self) -> str:
        """What the catalogue database knows this run's embeddings by: a digest of its weights, input spec and projection.

        A refit, or the same weights shown photos another way, is another model; a copy of the run is the same one.
        """
        h = hashlib.sha256(self.weights_digest.encode())
        h.update(json.dumps(self.spec.to_json(), sort_keys=True).encode())
        if (self / self.PROJECTION).is_file():
            h.update(file_digest(self / self.PROJECTION).encode())
        return h.hexdigest()[:24]

    @cached_property
    def projection(self) -> Projection | None:
        """How this run stores embeddings in the catalogue smaller (projection.pt), if it does."""
        path = self / self.PROJECTION
        return Projection.load(path) if path.is_file() else None

    def open_catalogue(self, db: str | os.PathLike | None = None) -> CatalogueStore:
        """The catalogue database this run matches against (`db`, or the models folder's).

        A run from before the catalogue database has its catalogue.pt added to it once, with a notice;
        the file is left as it was. Photos the database holds without this run's embedding are
        embedded when a Matcher loads it.
        """
        if not self.method.has_catalogue:
            raise WhalefastError(f"{self.path}: a {self.method.name} model has no catalogue; only arcface models (fit --method arcface) have one")
        store = CatalogueStore(db or self.catalogue_db)
        legacy = self / self.CATALOGUE
        if not store.has_model(self.model_key) and legacy.is_file():
            raw = load_legacy(legacy)
            records = [
                PhotoRecord(Path(p), d, raw["ids"][label], f"{self.name} catalogue.pt")
                for p, d, label in zip(raw["photos"], raw["digests"], raw["labels"].tolist())
            ]
            store.add_photos(records, what=str(legacy), model=self.model_key, vectors=raw["embeddings"].numpy(), keep=True)
            console.print(f"migrated {legacy} ({len(records)} photos) into the catalogue database {store.path}; {legacy.name} is left as it was")
        return store

    def catalogue(self, db: str | os.PathLike | None = None, photo_filter: PhotoFilter | None = None) -> Catalogue:
        """The catalogue of an arcface run, read from the catalogue database (only the photos `photo_filter` lets through)."""
        with self.open_catalogue(db) as store:
            return Catalogue.from_rows(store.rows(self.model_key, photo_filter), self.learnt.vocab)

    def member(self, index: int) -> Run:
        return Run(self.path / MEMBERS_DIR / str(index))

    # Training state

    def start_files(self, config: dict, learnt: Learnt | None = None, spec: InputSpec | None = None) -> dict[Path, dict]:
        """The files a new run writes when its first epoch ends, in order: status (training) first, then what it is."""
        files = {self / self.STATUS: {"state": TRAINING}, self / self.CONFIG: config}
        if learnt is not None:
            files[self / self.LEARNT] = asdict(learnt)
        if spec is not None:
            files[self / self.INPUT] = spec.to_json()
        return files

    def mark_finished(self) -> None:
        write_json({"state": FINISHED}, self / self.STATUS)

    def is_finished(self) -> bool:
        """Whether the run finished; a run from before status.json finished where its last file exists."""
        path = self / self.STATUS
        if not path.is_file():
            return (self / self.LAST_WRITTEN[self.kind if (self / self.CONFIG).is_file() else WHALES]).is_file()
        try:
            return json.loads(path.read_text()).get("state") == FINISHED
        except (ValueError, AttributeError):
            return False

    def is_resumable(self) -> bool:
        return (self / self.CONFIG).is_file() and ((self / self.RESUME).is_file() or any(self.path.glob(f"{MEMBERS_DIR}/*/{self.RESUME}")))

    def unfinished_text(self) -> str:
        """What an unfinished run folder holds and what to do about it, for an error message."""
        import pandas as pd

        if (self / self.CONFIG).is_file() and self.kind == BOXES:
            return f"its boxes fit did not finish; run `whalefast boxes fit --name {self.name}` again"
        done = ""
        with contextlib.suppress(Exception):
            done = f" after {len(pd.read_csv(self / self.HISTORY).epoch.unique())} epochs"
        if self.is_resumable():
            return f"its fit stopped{done} and did not finish; continue it with `whalefast fit --name {self.name} --models-dir {self.path.parent} --resume`"
        return f"a fit that stopped{done} left no weights to resume; fit it again"


def whale_network(cfg: FitConfig, n_classes: int) -> nn.Module:
    """The network (or ensemble of networks) of a run with these settings, uninitialised, in the layout its checkpoint was saved from."""
    method = get_method(cfg.method)
    if cfg.members > 1:
        return Ensemble([whale_network(member_config(cfg, i), n_classes) for i in range(cfg.members)], method.combine)
    return build_model(cfg.arch, n_classes, head=method.head(cfg, n_classes, training=False))
