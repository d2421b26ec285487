"""The end of a fit: the new_whale threshold calibrated on validation with the best weights, the catalogue, and the run marked finished."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from whalefast.core.console import results, warn
from whalefast.core.files import write_json
from whalefast.core.spec import InputSpec
from whalefast.data.loaders import TrainingData
from whalefast.db.store import CatalogueStore, PhotoRecord
from whalefast.learn.distributed import is_main_process
from whalefast.runs.catalogue import Projection
from whalefast.runs.config import FitConfig, Learnt
from whalefast.runs.folder import Run
from whalefast.runs.methods import Embedded, get_method


def finish(
    run: Run,
    cfg: FitConfig,
    spec: InputSpec,
    learnt: Learnt,
    network: nn.Module,
    data: TrainingData,
    best_epoch: int | list[int],
    valid_loss: float,
    scored: Embedded | None = None,
    calibrated: dict | None = None,
    catalogue: bool = True,
) -> dict:
    """Calibrate the new_whale threshold on validation through the one embed path; save it and the catalogue; mark the run finished; report the figures.

    The labelled photos are embedded once, for the validation ranking (the training ones) and the
    catalogue (all of them). `scored` holds the outputs the training-time MAP@5 computed: where they
    came from the best epoch's weights (one-cycle runs usually end on their best), they are used as they are.
    `calibrated`: the calibration of another network (fit --refit's validation run), kept as it is,
    for a network that trained on every labelled photo (`data` with no held-out photos left). Without
    `catalogue`, the run's photos are not catalogued (a refit's validation run: its network is not the model).
    """
    method = get_method(cfg.method)
    reuse = scored is not None and scored.epoch == best_epoch and scored.network is network
    embedded = scored if reuse else Embedded(method, network, spec, data, cfg.bs)
    known = method.known(embedded, validation_too=calibrated is None)  # a refit's held-out rows are copies of photos it trained on
    projection = method.projection(known, cfg.catalogue_dims)
    if calibrated is None:
        threshold, score, top1 = method.score_validation(embedded, known, projection)
        calibration = {"threshold": threshold, "valid_map5": score, "valid_top1": top1, "best_epoch": best_epoch, "valid_loss": valid_loss}
    else:
        calibration = {**calibrated, "refit_best_epoch": best_epoch, "refit_valid_loss": valid_loss}
        threshold, score, top1 = (calibrated[k] for k in ("threshold", "valid_map5", "valid_top1"))
    if is_main_process():
        save_projection(run, projection)  # a run that catalogued nothing still matches as it would have (fit --refit's validation run)
        records = method.catalogue_records(known, cfg.data, projection) if catalogue else None
        if records is not None:
            save_catalogue(run, *records)
        write_json(calibration, run / Run.CALIBRATION)
        run.mark_finished()
        epochs = f"best epochs {', '.join(map(str, best_epoch))}" if isinstance(best_epoch, list) else f"best epoch {best_epoch}"
        results.print(
            f"{epochs} (valid loss {valid_loss:.4f}); validation MAP@5 {score:.4f}, top-1 {top1:.4f}, "
            f"new_whale threshold {threshold if threshold is None else round(threshold, 4)}",
            highlight=False,
        )
    return {"run_dir": str(run.path), **calibration}


def save_projection(run: Run, projection: Projection | None) -> None:
    """How the run stores embeddings smaller, or no file where it stores them as they are."""
    if projection is not None:
        projection.save(run / Run.PROJECTION)
    else:
        (run / Run.PROJECTION).unlink(missing_ok=True)  # an earlier fit's of the same name


def save_catalogue(run: Run, records: list[PhotoRecord], vectors: torch.Tensor) -> None:
    """The run's labelled photos and their embeddings (as the run stores them) into the catalogue database beside it (photos it holds already keep their ids there)."""
    with CatalogueStore(run.catalogue_db) as store:
        added = store.add_photos(records, what=f"{run.name}'s training photos", model=run.model_key, vectors=vectors.float().cpu().numpy(), keep=True)
    if added.kept:
        path, there, given = added.kept[0]
        warn(
            f"{store.path}: {len(added.kept)} training photos are catalogued under other ids than train.csv gives (e.g. {Path(path).name}: {there}, not {given}); the catalogue's ids are kept"
        )
