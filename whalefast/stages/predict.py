"""The predict stage: ranked matches for photos, as tables, JSON or a review sheet."""

from __future__ import annotations

import os
from pathlib import Path

from whalefast import NEW_WHALE
from whalefast.core.errors import WhalefastError
from whalefast.core.files import atomic_path
from whalefast.core.images import list_images, open_rgb
from whalefast.match.matcher import Matcher


def expand_photos(paths: list[str | os.PathLike]) -> list[Path]:
    """Photos named directly, plus the image files inside any folder named (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(p / n for n in list_images(p)) if p.is_dir() else out.append(p)
    return out


def predict(images: list[str | os.PathLike], model: Matcher | str | os.PathLike, top: int = 5) -> list[dict]:
    """For each photo (or each photo in a folder), its `top` ids with scores; unreadable photos get an "error" instead.

    `model` is a run folder or its Matcher (loaded once, for a review sheet too); new_whale is placed
    by the calibrated threshold.
    """
    if top < 1:
        raise WhalefastError(f"--top must be at least 1, got {top}")
    photos = expand_photos(images)
    if not photos:
        raise WhalefastError(f"no photos in {', '.join(map(str, images))}")
    matcher = model if isinstance(model, Matcher) else Matcher(model)
    loaded = [(p, *found) for p, found in zip(photos, matcher.loader.load_many(photos))]
    readable = [(p, a) for p, a, problem in loaded if not problem]
    ranked = iter(matcher.ranked([a for _, a in readable], k=top)) if readable else iter(())
    results = []
    for path, _, problem in loaded:
        if problem:
            results.append({"image": str(path), "error": problem})
        else:
            results.append({"image": str(path), "matches": [{"id": i, "score": round(s, 4)} for i, s in next(ranked)]})
    return results


def example_photos(matcher: Matcher) -> dict[str, Path]:
    """One known photo per id: from the catalogue of an arcface run, else from the training data."""
    first: dict[str, Path] = {}
    for photo, wid in matcher.known_photos():
        first.setdefault(wid, photo)
    return first


def review_sheet(results: list[dict], matcher: Matcher, out: str | os.PathLike) -> Path:
    """A PNG with each query photo beside one catalogue photo of each proposed whale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if "matches" in r]
    if not results:
        raise WhalefastError("no readable photos to show on a review sheet")
    examples = example_photos(matcher)
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
            elif match["id"] == NEW_WHALE:
                ax.text(0.5, 0.5, "new whale?", ha="center", va="center")
            else:
                ax.text(0.5, 0.5, "photo not found" if photo is not None else "no catalogue photo", ha="center", va="center")
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
