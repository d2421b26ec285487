"""How small a catalogue's embeddings can be: test MAP@5 of a finished arcface run with its embeddings stored smaller.

Embeds the run's labelled photos, its validation photos and the test photos once, through the run's
own embed path (its views: parts and test-time scales), then scores every variant the way submit
does: the new_whale threshold calibrated on validation against the training photos in that variant's
space, the catalogue of every labelled photo, hash-matched training ids first. Variants: float32 as
today, float16, the test-time views averaged instead of placed side by side, and a PCA fitted on the
training photos' embeddings to 1024, 512 or 256 dimensions (each also in float16).

    python bench/embedding_size.py --run WORK/models/arcface-predicted --data WORK/data   # a run that bench/real_flukes.py left
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from whalefast.core.ranking import calibrate_threshold, cosine_id_scores, map5_labels, rank_with_new_whale
from whalefast.data.layout import test_images
from whalefast.data.loaders import TrainingData, training_items
from whalefast.data.prepared import image_cache, load_split
from whalefast.match.matcher import Matcher
from whalefast.runs.methods import validation_targets
from whalefast.stages.submit import apply_matches, hash_matches


def embed_all(matcher: Matcher, data: Path, prepared: Path):
    """(known rows, known, validation, test names, test) embeddings at full size, float32, unit length."""
    items, vocab = training_items(load_split(prepared))
    known_rows = items[items.Id != "new_whale"]
    train = image_cache(data, prepared, "train", items.Image.tolist(), matcher.spec)
    names = test_images(data)
    test = image_cache(data, prepared, "test", names, matcher.spec)
    start = time.time()
    embedded = [
        F.normalize(matcher.outputs([images[n] for n in subset]).float(), dim=1)
        for images, subset in ((train, known_rows.Image), (train, items[items.is_valid].Image), (test, names))
    ]
    print(f"embedded {sum(len(e) for e in embedded)} photos in {time.time() - start:.0f} s", flush=True)
    return items, vocab, known_rows, embedded[0], embedded[1], names, embedded[2]


def average_views(x: torch.Tensor, views: int) -> torch.Tensor:
    """The mean of a run's `views` test-time views (blocks side by side), as one unit vector."""
    return F.normalize(x.reshape(len(x), views, -1).mean(1), dim=1)


class PCA:
    """A projection to `dims` principal components fitted on `x` (centred), output renormalised."""

    def __init__(self, x: torch.Tensor, dims: int):
        self.mean = x.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(x - self.mean, full_matrices=False)
        self.components = v[:dims].T

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize((x - self.mean) @ self.components, dim=1)


class Scoring:
    """Scores embedding variants as submit would: threshold calibrated on validation against the training photos, then the test photos."""

    def __init__(self, items, vocab, known_rows, prepared: Path, data: Path, names: list[str]):
        self.ids = list(dict.fromkeys(list(vocab) + known_rows.Id.tolist()))  # as the catalogue orders them: ids held out whole come last
        code = {v: i for i, v in enumerate(self.ids)}
        self.labels = torch.tensor([code[i] for i in known_rows.Id])
        self.train = torch.tensor((~known_rows.is_valid).to_numpy())
        self.valid_targets = validation_targets(TrainingData(None, items, vocab, None))
        self.names, self.matches = names, hash_matches(prepared)
        truth = pd.read_csv(data / "test_answers.csv").set_index("Image").Id
        self.truth = [truth[n] for n in names]

    def __call__(self, variant, known, valid, test) -> dict:
        k, v, t = variant(known), variant(valid), variant(test)
        n = len(self.ids)
        threshold, valid_map5 = calibrate_threshold(cosine_id_scores(v, k[self.train], self.labels[self.train], n), self.valid_targets)
        ranked = rank_with_new_whale(cosine_id_scores(t, k, self.labels, n), threshold)
        ids = [[self.ids[i] if i >= 0 else "new_whale" for i in row] for row in ranked.tolist()]
        rows = [apply_matches(r, self.matches.get(name, [])) for name, r in zip(self.names, ids)]
        return {"dims": k.shape[1], "valid_map5": round(valid_map5, 4), "test_map5": round(map5_labels(rows, self.truth), 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished arcface run folder")
    parser.add_argument("--data", type=Path, required=True, help="its data folder, with test_answers.csv")
    parser.add_argument("--prepared", type=Path, help="its prepared folder (default DATA/prepared)")
    parser.add_argument("--cache", type=Path, help="keep the embeddings in this file, and read them from it the next time")
    args = parser.parse_args()
    prepared = args.prepared or args.data / "prepared"
    matcher = Matcher(args.run)
    if args.cache and args.cache.is_file():
        items, vocab, known_rows, known, valid, names, test = torch.load(args.cache, weights_only=False)
    else:
        items, vocab, known_rows, known, valid, names, test = embed_all(matcher, args.data, prepared)
        if args.cache:
            torch.save((items, vocab, known_rows, known, valid, names, test), args.cache)
    scoring = Scoring(items, vocab, known_rows, prepared, args.data, names)
    views = len(matcher.spec.scales)
    train_known = known[scoring.train]
    half = lambda f: lambda x: F.normalize(f(x).half().float(), dim=1)  # noqa: E731 - stored as float16, scored in float32
    variants = {"float32 (today)": lambda x: x, "float16": half(lambda x: x)}
    if views > 1:
        variants["views averaged"] = lambda x: average_views(x, views)
        variants["views averaged, float16"] = half(lambda x: average_views(x, views))
    for dims in (1024, 512, 256):
        pca = PCA(train_known, dims)
        variants[f"PCA {dims}"] = pca
        variants[f"PCA {dims}, float16"] = half(pca)
    rows = []
    for name, variant in variants.items():
        rows.append({"variant": name, **scoring(variant, known, valid, test)})
        rows[-1]["bytes_per_photo"] = rows[-1]["dims"] * (2 if "float16" in name else 4)
        print(pd.DataFrame(rows).to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
