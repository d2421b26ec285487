"""Inference views on finished fold-in runs, without training again: what each view set scores, and what it costs.

A fold-in run (fit --fold-in, the flukes recipe) has two networks: RUN/validation calibrates the
new_whale threshold, RUN is the model. For each view set (test-time scales, with or without the
mirror view) both networks go through fit's own last steps again, in a copy of the run under
WORK/views/NAME: calibration on validation (calibration.finish), the catalogue of every labelled
photo, then submit and evaluate on test. The seconds of those steps are what the view set costs a
fit and a submit; the original run is only read. The recipe's own view set repeats the run's figures.

    python bench/view_sets.py --work WORK                   # WORK: what bench/real_flukes.py left
    python bench/view_sets.py --work WORK --sets "15/14+mirror" "6/7,1,8/7+mirror"   # the flukes recipe, and before
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from whalefast.core.images import as_scales
from whalefast.core.spec import InputSpec
from whalefast.learn.calibration import finish
from whalefast.learn.trainer import training_data
from whalefast.runs.config import VALIDATION_RUN
from whalefast.runs.folder import Run
from whalefast.stages.evaluate import evaluate
from whalefast.stages.submit import submit

# What a copy needs of a run folder: the model is re-calibrated and re-catalogued, its ONNX graph exported again.
KEPT = (Run.CONFIG, Run.LEARNT, Run.WEIGHTS, Run.STATUS)
DEFAULT_SETS = ("15/14+mirror", "6/7,1,8/7+mirror", "1,8/7+mirror", "8/7+mirror", "6/7,1,8/7")


def view_spec(spec: InputSpec, text: str) -> InputSpec:
    """`spec` with the views of `text`: scales separated by commas, "+mirror" for the mirror view."""
    scales, _, mirror = text.partition("+")
    if mirror not in ("", "mirror"):
        raise SystemExit(f"--sets: {text!r}: only +mirror may follow the scales")
    return replace(spec, scales=as_scales(scales), mirror_view=mirror == "mirror")


def copy_run(source: Run, target: Path, spec: InputSpec) -> Run:
    """A copy of `source`'s trained state in `target`, its input spec `spec`."""
    target.mkdir(parents=True)
    for name in KEPT:
        shutil.copy(source / name, target / name)
    (target / Run.INPUT).write_text(json.dumps(spec.to_json(), indent=2))
    return Run(target)


def folder_name(text: str) -> str:
    """The folder under WORK/views of the view set `text`."""
    return text.replace(",", "_").replace("/", "-").replace("+", "_")


def score_view_set(model: Run, data: Path, work: Path, text: str, spec: InputSpec) -> dict:
    """Calibrate, catalogue and submit `model` (a finished fold-in run) with the view set `text` (its spec `spec`) in work/NAME; the figures and seconds."""
    first = Run(model / VALIDATION_RUN)
    name = folder_name(text)
    copy = copy_run(model, work / name / "models" / model.name, spec)
    copy_first = copy_run(first, copy / VALIDATION_RUN, spec)
    cfg_first, cfg = first.settings, model.settings
    held_out, every_photo = training_data(cfg_first, spec), training_data(cfg, spec, every_photo=True)
    start = time.time()
    calibrated = finish(copy_first, cfg_first, spec, first.learnt, first.network(), held_out, *best(first), catalogue=False)
    calibrated.pop("run_dir")
    calibrate_seconds = time.time() - start
    start = time.time()
    finish(copy, cfg, spec, model.learnt, model.network(), every_photo, *best(model, "refit_"), calibrated=calibrated)
    catalogue_seconds = time.time() - start
    start = time.time()
    out = submit(data, copy.path, work / name / "submission.csv")
    submit_seconds = time.time() - start
    scores = evaluate(out["out"], data / "test_answers.csv")
    return {
        "views": text,
        "per_photo": spec.views,
        "valid_map5": round(calibrated["valid_map5"], 4),
        "threshold": round(calibrated["threshold"], 4),
        "test_map5": round(scores["map5"], 4),
        "test_catalogued": round(scores["map5_catalogued"], 4),
        "test_new_whale": round(scores["map5_new_whale"], 4),
        "test_top1": round(scores["top1"], 4),
        "calibrate_s": round(calibrate_seconds),
        "catalogue_s": round(catalogue_seconds),
        "submit_s": round(submit_seconds),
        "total_s": round(calibrate_seconds + catalogue_seconds + submit_seconds),
    }


def best(run: Run, prefix: str = "") -> tuple[int, float]:
    """The best epoch and validation loss `run`'s calibration.json records (a fold-in's own under `prefix`)."""
    return run.calibration[f"{prefix}best_epoch"], run.calibration[f"{prefix}valid_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a folder bench/real_flukes.py left (data/, models/)")
    parser.add_argument("--run", default="arcface-predicted", help="the run's name in WORK/models")
    parser.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), help='view sets: scales, then "+mirror" for the mirror view')
    args = parser.parse_args()
    model = Run.open(args.work / "models" / args.run)
    if not (model / VALIDATION_RUN).is_dir():
        parser.error(f"{model.path}: not a fold-in run (no {VALIDATION_RUN}/); these views are scored as fit --fold-in calibrates")
    specs = {text: view_spec(model.spec, text) for text in args.sets}  # a bad set stops before any work
    out = args.work / "views"
    earlier = [str(out / folder_name(text)) for text in args.sets if (out / folder_name(text)).exists()]
    if earlier:
        parser.error(f"views already scored in {', '.join(earlier)}: remove those folders, or choose other --sets")
    rows = []
    for text, spec in specs.items():
        rows.append(score_view_set(model, args.work / "data", out, text, spec))
        print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    table.to_csv(out / "view_sets.csv", index=False)


if __name__ == "__main__":
    main()
