"""The demo: every stage on the embedded synthetic dataset, sized for a few minutes on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

from whalefast.core.console import console, results, table
from whalefast.data.boxes_csv import write_training_boxes
from whalefast.data.synth import SynthConfig, generate
from whalefast.learn.boxes import fit_boxes
from whalefast.learn.trainer import fit
from whalefast.runs.config import BoxConfig, FitConfig
from whalefast.runs.recipes import method_settings
from whalefast.stages.evaluate import evaluate
from whalefast.stages.prepare import PrepareConfig, prepare
from whalefast.stages.submit import submit

DEMO_SIZE = (64, 128)  # the flukes recipe, at a size that keeps the demo to minutes on a CPU


def demo_config(data: Path, models_dir: Path, method: str, epochs: int) -> FitConfig:
    """The flukes recipe as the demo fits it: DEMO_SIZE, `epochs`, no fold-in, and for softmax no mirror view (it compares embeddings)."""
    # fold_in 0: every epoch trains on the training photos alone, so the validation figures the demo prints are its model's; the fold-in's gain was measured on real flukes
    options = {
        "data": data,
        "recipe": "flukes",
        **method_settings(method),
        "epochs": epochs,
        "size": DEMO_SIZE,
        "name": f"demo-{method}",
        "models_dir": models_dir,
    }
    return FitConfig.from_options({**options, "fold_in": 0})


def run_demo(data: str | os.PathLike = "data/demo", models_dir: str | os.PathLike = "models", method: str = "arcface", epochs: int = 6) -> dict:
    """Generate (if absent), fit a box model, prepare with its fluke crops, fit the flukes recipe, submit and evaluate; returns the MAP@5 figures."""
    data, models_dir = Path(data), Path(models_dir)
    if not (data / "train.csv").exists():
        console.rule("synth: generating the demo dataset")
        generate(data, SynthConfig(seed=0))
    box_name = "demo-boxes"
    console.rule("boxes fit: a fluke box model from the training photos' boxes (the test boxes stay unseen)")
    train_boxes = write_training_boxes(data / "boxes.csv", data / "train.csv", data / "prepared" / "train_boxes.csv")
    boxes = fit_boxes(BoxConfig(data=str(data), boxes=str(train_boxes), name=box_name, models_dir=str(models_dir)))
    console.rule("prepare: dedup, split, every photo cropped to its predicted fluke box")
    prepare(data, cfg=PrepareConfig(boxes=box_name, models_dir=str(models_dir), min_samples=1))
    cfg = demo_config(data, models_dir, method, epochs)
    name = cfg.name
    console.rule(f"fit: the flukes recipe ({method}, {cfg.arch} at {DEMO_SIZE[0]}x{DEMO_SIZE[1]}px, {epochs} epochs)")
    fitted = fit(cfg)
    console.rule("submit and evaluate")
    submission = models_dir / name / "submission.csv"
    submit(data, models_dir / name, submission)
    scores = evaluate(submission, data / "test_answers.csv")
    results.print(
        table(
            "whalefast demo",
            ["", "value"],
            [
                ["box model: held-out IoU", f"{boxes['iou_mean']:.4f}"],
                ["validation MAP@5 (honest split)", f"{fitted['valid_map5']:.4f}"],
                ["test MAP@5 (held-out answers)", f"{scores['map5']:.4f}"],
                ["test MAP@5, catalogued whales", f"{scores['map5_catalogued']:.4f}"],
                ["test MAP@5, new_whale", f"{scores['map5_new_whale']:.4f}"],
                ["test MAP@5, ids with one training photo", f"{scores['map5_single_photo_ids']:.4f}"],
            ],
        )
    )
    print(f"validation MAP@5: {fitted['valid_map5']:.4f}")
    print(f"test MAP@5: {scores['map5']:.4f}")
    console.print(f"review its matches in a browser: whalefast serve --model {name}" + (f" --models-dir {models_dir}" if str(models_dir) != "models" else ""))
    return {"box_iou": boxes["iou_mean"], "valid_map5": fitted["valid_map5"], "test": scores, "run_dir": str(models_dir / name)}
