"""The end of a fit: the new_whale threshold calibrated on validation with the best weights, the catalogue, and the run marked finished."""

from __future__ import annotations

from torch import nn

from whalefast.core.console import results
from whalefast.core.files import write_json
from whalefast.core.spec import InputSpec
from whalefast.data.loaders import TrainingData
from whalefast.learn.distributed import is_main_process
from whalefast.runs.config import FitConfig, Learnt
from whalefast.runs.folder import Run
from whalefast.runs.methods import get_method


def finish(
    run: Run, cfg: FitConfig, spec: InputSpec, learnt: Learnt, network: nn.Module, data: TrainingData, best_epoch: int | list[int], valid_loss: float
) -> dict:
    """Calibrate the new_whale threshold on validation through the one embed path; save it and the catalogue; mark the run finished; report the figures.

    The labelled photos are embedded once, for the validation ranking (the training ones) and the catalogue (all of them).
    """
    method = get_method(cfg.method)
    known = method.known(network, spec, data, cfg.bs)
    threshold, score, top1 = method.score_validation(network, spec, data, cfg.bs, known)
    calibration = {"threshold": threshold, "valid_map5": score, "valid_top1": top1, "best_epoch": best_epoch, "valid_loss": valid_loss}
    if is_main_process():
        catalogue = method.catalogue(known, learnt.vocab, cfg.data)
        if catalogue is not None:
            run.save_catalogue(catalogue)
        write_json(calibration, run / Run.CALIBRATION)
        run.mark_finished()
        epochs = f"best epochs {', '.join(map(str, best_epoch))}" if isinstance(best_epoch, list) else f"best epoch {best_epoch}"
        results.print(
            f"{epochs} (valid loss {valid_loss:.4f}); validation MAP@5 {score:.4f}, top-1 {top1:.4f}, "
            f"new_whale threshold {threshold if threshold is None else round(threshold, 4)}",
            highlight=False,
        )
    return {"run_dir": str(run.path), **calibration}
