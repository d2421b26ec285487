"""Accuracy on real fluke photos: MAP@5 on a labelled real set in the Kaggle layout, per crop mode and method.

Runs whalefast's own stages (boxes fit, prepare, fit, submit, evaluate) on a private copy of the
data, never on the original. Crop modes: the whole photo ("none"), the boxes given in boxes.csv
("given"), and boxes predicted by a box model trained on the training photos' boxes alone
("predicted"; the test boxes are never seen). Methods: softmax and arcface, each the flukes recipe
with recipes.method_settings. Prints one table row per run, wall times included, and writes the table as CSV,
with the machine's speed before and after the runs (backbone_speed.yardstick), so that minutes on
different VMs can be compared.

    python bench/real_flukes.py --data ../shared/data/real-flukes-100px               # every row (about 2.5 h on 2 CPU cores)
    python bench/real_flukes.py --data ../shared/data/real-flukes-100px --crops predicted --methods arcface   # the recipe, end to end
    python bench/real_flukes.py --data ../shared/data/real-flukes-100px --crops predicted --methods arcface --members 2   # an ensemble of two (without the fold-in)
"""

from __future__ import annotations

import argparse
import ast
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
from backbone_speed import yardstick

from whalefast.core.images import size_text
from whalefast.data.boxes_csv import write_training_boxes
from whalefast.db import CATALOGUE_DB
from whalefast.learn.boxes import fit_boxes
from whalefast.learn.trainer import fit
from whalefast.runs.config import VALIDATION_RUN, BoxConfig, FitConfig, option_text
from whalefast.runs.recipes import method_settings
from whalefast.stages.evaluate import evaluate
from whalefast.stages.prepare import PrepareConfig, prepare
from whalefast.stages.submit import submit

METHODS = ("softmax", "arcface")  # each fits the flukes recipe with recipes.method_settings


def private_copy(source: Path, work: Path) -> Path:
    """A copy of the Kaggle-layout files of `source` in `work` (the original is only read)."""
    data = work / "data"
    data.mkdir(parents=True)
    for name in ("train.csv", "sample_submission.csv", "test_answers.csv", "boxes.csv"):
        if (source / name).is_file():
            shutil.copy(source / name, data / name)
    for folder in ("train", "test"):
        shutil.copytree(source / folder, data / folder)
    return data


def run(args) -> pd.DataFrame:
    work = Path(args.work or tempfile.mkdtemp(prefix="whalefast-real-"))
    data = private_copy(Path(args.data), work)
    models = work / "models"
    rows = []
    box_seconds = 0.0
    speed_before = yardstick()  # minutes mean little across VMs without it: their CPUs train up to 1.9x apart
    print(f"this machine trains the backbone at {speed_before:.1f} images/s (bench/backbone_speed.py's yardstick)", flush=True)
    if "predicted" in args.crops:
        start = time.time()
        box = fit_boxes(
            BoxConfig(
                data=str(data),
                boxes=str(write_training_boxes(data / "boxes.csv", data / "train.csv", work / "train_boxes.csv")),
                models_dir=str(models),
                name="boxes",
                **({"epochs": args.box_epochs} if args.box_epochs else {}),
            )
        )
        box_seconds = time.time() - start
        print(f"box model: held-out IoU {box['iou_mean']:.3f} (>= 0.5: {box['iou_at_least_0.5']:.1%}) in {box_seconds:.0f} s", flush=True)
    for crop in args.crops:
        source = {"none": None, "given": str(data / "boxes.csv"), "predicted": "boxes"}[crop]
        start = time.time()
        prepare(data, cfg=PrepareConfig(boxes=source, models_dir=str(models), min_samples=1, valid_pct=args.valid_pct, seed=args.seed), quiet=True)
        prepare_seconds = time.time() - start
        for method in args.methods:
            name = f"{method}-{crop}"
            overrides = {"epochs": args.epochs, "size": args.size, "tta_scales": args.tta_scales, "parts": args.parts, **dict(args.set)}
            options = {
                "data": data,
                "recipe": "flukes",
                **method_settings(method),
                "name": name,
                "models_dir": models,
                "seed": args.seed,
                "members": args.members,
            }
            if args.members > 1:
                options["fold_in"] = 0  # as fit --members needs: an ensemble's networks are not folded in
            cfg = FitConfig.from_options({**options, **{k: v for k, v in overrides.items() if v is not None}})
            start = time.time()
            fitted = fit(cfg)
            fit_seconds = time.time() - start
            start = time.time()
            out = submit(data, models / name, work / f"{name}.csv")
            submit_seconds = time.time() - start
            scores = evaluate(out["out"], data / "test_answers.csv")
            total = prepare_seconds + fit_seconds + submit_seconds + (box_seconds if crop == "predicted" else 0)
            rows.append(
                {
                    "run": name,
                    "crop": crop,
                    "method": method,
                    "members": args.members,
                    "size": size_text(cfg.size),
                    "tta_scales": option_text(cfg.tta_scales),
                    "parts": cfg.parts,
                    "set": " ".join(f"{k}={v}" for k, v in args.set) or "-",
                    "valid_map5": round(fitted["valid_map5"], 4),
                    "test_map5": round(scores["map5"], 4),
                    "test_catalogued": round(scores["map5_catalogued"], 4),
                    "test_new_whale": round(scores["map5_new_whale"], 4),
                    "test_top1": round(scores["top1"], 4),
                    "fit_minutes": round(fit_seconds / 60, 1),
                    "end_to_end_minutes": round(total / 60, 1),
                }
            )
            if cfg.refits:  # its first run is this seed's run without the refit: scored on test beside it, against the same catalogue photos
                first = models / name / VALIDATION_RUN
                scores = evaluate(submit(data, first, work / f"{name}-{VALIDATION_RUN}.csv", db=models / CATALOGUE_DB)["out"], data / "test_answers.csv")
                rows.append(
                    {
                        **rows[-1],
                        "run": f"{name}/{VALIDATION_RUN}",
                        "test_map5": round(scores["map5"], 4),
                        "test_catalogued": round(scores["map5_catalogued"], 4),
                        "test_new_whale": round(scores["map5_new_whale"], 4),
                        "test_top1": round(scores["top1"], 4),
                        "fit_minutes": None,
                        "end_to_end_minutes": None,
                    }
                )
            print(pd.DataFrame(rows).to_string(index=False), flush=True)
    speed_after = yardstick()
    print(f"yardstick: {speed_before:.1f} images/s before the runs, {speed_after:.1f} after", flush=True)
    table = pd.DataFrame(rows).assign(yardstick_before=round(speed_before, 1), yardstick_after=round(speed_after, 1))
    table.to_csv(work / "real_flukes.csv", index=False)
    print(f"table written to {work / 'real_flukes.csv'}")
    return table


def setting(text: str) -> tuple[str, object]:
    """KEY=VALUE as FitConfig takes it: numbers and booleans parsed, anything else kept as text."""
    key, _, value = text.partition("=")
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key.strip(), value.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a real set in the Kaggle layout with test_answers.csv and boxes.csv")
    parser.add_argument("--work", help="working folder (default: a new temporary one)")
    parser.add_argument("--crops", nargs="+", default=["none", "given", "predicted"], choices=["none", "given", "predicted"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, help="override the recipes' epochs (quick checks)")
    parser.add_argument("--box-epochs", type=int, help="override the box model's epochs (BoxConfig's default otherwise)")
    parser.add_argument("--size", help="override the recipes' input size, HEIGHTxWIDTH")
    parser.add_argument("--tta-scales", help="override the recipes' test-time scales, e.g. 6/7,1,8/7 (1: none)")
    parser.add_argument("--parts", type=int, help="override the recipes' fit --parts (0: the whole photo only)")
    parser.add_argument("--members", type=int, default=1, help="fit --members: an ensemble of this many networks (each costs a full fit)")
    parser.add_argument("--valid-pct", type=float, default=0.05, help="prepare's --valid-pct: every held-out photo is one fewer to learn from")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--set", type=setting, action="append", default=[], metavar="KEY=VALUE", help="any other fit setting, e.g. --set margin_power=0.25")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
