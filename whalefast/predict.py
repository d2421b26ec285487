"""The predict stage: ranked matches for photos, as tables, JSON or a review sheet."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from whalefast import NEW_WHALE
from whalefast.errors import WhalefastError
from whalefast.inference import Scorer
from whalefast.io import atomic_path, load_square, open_rgb


def predict(images: list[str | os.PathLike], run_dir: str | os.PathLike, top: int = 5, tta: bool = True) -> list[dict]:
    """For each photo, its `top` most likely ids with scores (new_whale placed by the calibrated threshold)."""
    scorer = Scorer(run_dir)
    arrays = []
    for path in images:
        path = Path(path)
        if not path.is_file():
            raise WhalefastError(f"{path}: file not found")
        try:
            arrays.append(load_square(path, scorer.cfg.size))
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            raise WhalefastError(f"{path}: unreadable image ({type(e).__name__})") from None
    ranked = scorer.rank(scorer.scores(arrays, tta=tta), k=top)
    return [{"image": str(p), "matches": [{"id": i, "score": round(s, 4)} for i, s in r]} for p, r in zip(images, ranked)]


def example_photos(run_dir: str | os.PathLike) -> dict[str, Path]:
    """One catalogue photo per id, from the training data the run was fitted on."""
    from whalefast.train import load_config

    cfg = load_config(run_dir)
    data = Path(cfg.data)
    clean = cfg.prepared_dir / "train_clean.csv"
    labels = pd.read_csv(clean if clean.exists() else data / "train.csv", dtype=str, keep_default_na=False)
    labels = labels[labels.Id != NEW_WHALE].drop_duplicates("Id")
    return {r.Id: data / "train" / r.Image for r in labels.itertuples()}


def review_sheet(results: list[dict], run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A PNG with each query photo beside one catalogue photo of each proposed whale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = example_photos(run_dir)
    cols = 1 + max(len(r["matches"]) for r in results)
    fig, axes = plt.subplots(len(results), cols, figsize=(2.6 * cols, 2.0 * len(results)), squeeze=False)
    for row, result in zip(axes, results):
        for ax in row:
            ax.axis("off")
        row[0].imshow(open_rgb(result["image"]))
        row[0].set_title(f"query: {Path(result['image']).name}", fontsize=8)
        for ax, match in zip(row[1:], result["matches"]):
            photo = examples.get(match["id"])
            if photo is not None and photo.is_file():
                ax.imshow(open_rgb(photo))
            else:
                ax.text(0.5, 0.5, "no catalogue photo" if match["id"] != NEW_WHALE else "new whale?", ha="center", va="center")
            title = f"{match['id']}  {match['score']:.3f}"
            if match["id"] == NEW_WHALE:  # its score is the calibrated threshold, not a similarity
                title = f"new_whale (threshold {match['score']:.3f})"
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return out
