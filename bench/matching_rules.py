"""Matching rules on one finished arcface run, without training again: what the catalogue and the ranking can add.

Every labelled and test photo is embedded once (the run's network and views); each rule then ranks
the validation photos against the training photos (its new_whale threshold calibrated there, as fit
calibrates) and the test photos against the final catalogue (hash-matched ids first, as submit does),
scored against test_answers.csv:
- knn: today's rule, each id scored by its nearest catalogue photo;
- sightings: photos labelled new_whale kept as unnamed sightings; a photo nearer to one of them
  than the threshold puts new_whale at that sighting's score;
- centre A: each id's score blended, A * nearest photo + (1 - A) * its ArcFace class centres;
- pseudo T: photos whose first answer scores at least T join the catalogue under it (transductive;
  precision of those labels on validation and on test);
and their combinations. With --mirror, every rule also runs on each photo's mirror image beside it
(photo against photo and mirror against mirror, the two cosines averaged): a mirrored fluke is
another pattern, but the same for query and catalogue. --flips mirror,upside,turned adds such views
one at a time (mirrored; upside down; both, a half turn), each set of views scored with every rule.

    python bench/matching_rules.py --run WORK/models/arcface-predicted --data WORK/data    # WORK: what bench/real_flukes.py left
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from whalefast import NEW_WHALE
from whalefast.core.files import atomic_path, load_saved
from whalefast.core.labels import read_labels
from whalefast.core.ranking import NEW_WHALE_TARGET, cosine_id_scores, map5, map5_labels, rank_with_new_whale
from whalefast.data.layout import test_images
from whalefast.data.prepared import image_cache, load_split
from whalefast.match.matcher import Matcher
from whalefast.runs.folder import Run
from whalefast.stages.submit import apply_matches, hash_matches

# Flipped views of a photo (height, width[, channels]): each is compared with the catalogue's photos flipped the same way.
FLIPS = {"mirror": lambda a: a[:, ::-1], "upside": lambda a: a[::-1], "turned": lambda a: a[::-1, ::-1]}


def class_centres(run: Run) -> list[torch.Tensor]:
    """The unit ArcFace class centres (ids, dims) of each embedding block, whole photo first, as the checkpoint holds them."""
    state = load_saved(run / Run.WEIGHTS, "model")
    keys = sorted((k for k in state if k.endswith(".W") and "arcface" in k), key=lambda k: (".part_arcfaces." in k, k))
    return [F.normalize(state[k].float().T, dim=1) for k in keys]


def centre_scores(raw: torch.Tensor, centres: list[torch.Tensor], views: int, n_ids: int) -> torch.Tensor:
    """(photos, training ids): mean over views and blocks of each block's cosine to the id's centre (sub-centres, id-major as pytorch-metric-learning keeps them: the nearest)."""
    blocks = raw.float().reshape(len(raw), views, len(centres), -1)
    total = torch.zeros(len(raw), n_ids)
    for b, centre in enumerate(centres):
        cosines = (F.normalize(blocks[:, :, b], dim=2) @ centre.T).mean(1)
        total += cosines.reshape(len(raw), n_ids, -1).amax(2)
    return total / len(centres)


def calibrate(scores: torch.Tensor, sighting: torch.Tensor | None, targets: torch.Tensor) -> tuple[float, float]:
    """The threshold maximising validation MAP@5 under the rule (new_whale at max(threshold, nearest sighting)), and that MAP@5."""
    top = scores.max(1).values
    candidates = torch.unique(torch.cat([torch.quantile(top, torch.linspace(0, 1, 81)), torch.linspace(float(top.min()), float(top.max()) + 1e-6, 81)]))
    best = (0.0, -1.0)
    for t in candidates.tolist():
        new_score = torch.full((len(scores),), t) if sighting is None else sighting.clamp(min=t)
        value = map5(rank_with_new_whale(scores, new_score[:, None]), targets)
        if value > best[1] + 1e-12:
            best = (t, value)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the run's data folder, prepared, with test_answers.csv")
    parser.add_argument("--blends", default="1,0.8,0.6,0.5")
    parser.add_argument("--pseudo", default="0.6,0.7,0.8")
    parser.add_argument("--json", type=Path, help="append the rows to this JSON-lines file")
    parser.add_argument("--mirror", action="store_true", help="also each rule with the photos' mirror images as a second view (--flips mirror)")
    parser.add_argument("--flips", default="", help=f"flipped views added one at a time, from {', '.join(FLIPS)}")
    args = parser.parse_args()
    flips = [f for f in args.flips.split(",") if f] or (["mirror"] if args.mirror else [])
    if unknown := set(flips) - set(FLIPS):
        parser.error(f"--flips: unknown {', '.join(sorted(unknown))}; choose from {', '.join(FLIPS)}")
    matcher = Matcher(args.run)
    run, spec = matcher.run, matcher.spec
    if spec.mirror_view:
        parser.error(f"{args.run} was fitted with --mirror-view: these rules score a run without it (--mirror adds the view here)")
    views = len(spec.scales)
    prepared = args.data / "prepared"
    split = load_split(prepared)
    vocab = list(run.learnt.vocab)
    code = {v: i for i, v in enumerate(vocab)}

    def embed(folder: str, names: list[str], flip: str | None) -> torch.Tensor:
        images = image_cache(args.data, prepared, folder, names, spec)
        arrays = [np.ascontiguousarray(FLIPS[flip](images[n])) if flip else images[n] for n in names]
        return matcher.method.embed(matcher.network, arrays, spec, bs=64).cpu().float()

    test_names = test_images(args.data)

    def outputs(flip: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The labelled and test photos' outputs of these weights (or of their flipped images), kept for the next call."""
        cache = args.run / f"matching_rules_{flip or 'outputs'}.pt"
        if cache.is_file() and (saved := torch.load(cache))["digest"] == run.weights_digest:
            return saved["labelled"], saved["test"]
        labelled, test = embed("train", split.Image.tolist(), flip), embed("test", test_names, flip)
        with atomic_path(cache) as tmp:
            torch.save({"digest": run.weights_digest, "labelled": labelled, "test": test}, tmp)
        return labelled, test

    raw_labelled, raw_test = outputs(None)
    project = matcher.projection or (lambda x: F.normalize(x, dim=1))
    projected = {None: (project(raw_labelled), project(raw_test))} | {f: tuple(map(project, outputs(f))) for f in flips}
    view_sets = [tuple(flips[:k]) for k in range(len(flips) + 1)]
    # Each view unit length side by side, scaled by 1/sqrt(views): the dot product is the mean of the views' cosines.
    embeddings_of = {views: tuple(torch.cat([projected[v][i] for v in (None, *views)], 1) / math.sqrt(1 + len(views)) for i in (0, 1)) for views in view_sets}
    centres = class_centres(run)
    centre_labelled, centre_test = centre_scores(raw_labelled, centres, views, len(vocab)), centre_scores(raw_test, centres, views, len(vocab))

    is_valid = torch.tensor(split.is_valid.to_numpy(dtype=bool))
    is_new = torch.tensor((split.Id == NEW_WHALE).to_numpy())
    # Validation: queries are the held-out photos; the catalogue the training photos of training ids (as fit scores it).
    in_vocab = torch.tensor(split.Id.isin(code).to_numpy())
    train_cat = ~is_valid & ~is_new & in_vocab
    valid_targets = torch.tensor([code.get(t, NEW_WHALE_TARGET) for t in split.target[is_valid.numpy()]])
    # Test: the final catalogue, every labelled photo of an id (ids beyond the vocabulary after it).
    ids = vocab + sorted(set(split.Id[~is_new.numpy()]) - set(vocab))
    final_code = {v: i for i, v in enumerate(ids)}
    truth = dict(zip(*read_labels(args.data / "test_answers.csv")[["Image", "Id"]].T.values))
    test_targets = torch.tensor([final_code.get(truth[n], NEW_WHALE_TARGET) for n in test_names])
    matches = hash_matches(prepared)

    def knn(queries, rows, labels, n_ids):
        return cosine_id_scores(queries, rows, labels, n_ids) if len(rows) else torch.full((len(queries), n_ids), -2.0)

    def id_scores(queries, centre, rows, labels, n_ids, blend):
        scores = knn(queries, rows, labels, n_ids)
        if blend < 1:
            trained = scores[:, : len(vocab)]
            has_photo = trained > -2
            mixed = blend * trained + (1 - blend) * centre
            scores[:, : len(vocab)] = torch.where(has_photo, mixed, trained)
        return scores

    def sightings_of(queries, rows):
        return (queries @ rows.T).max(1).values if len(rows) else None

    def pseudo_rows(queries, scores, threshold, tau):
        """Queries whose first answer is an id scoring at least tau and above the threshold: (row indices, their ids)."""
        best, best_id = scores.max(1)
        chosen = (best >= max(tau, threshold)).nonzero().flatten()
        return chosen, best_id[chosen]

    def evaluate(blend: float, sightings: bool, tau: float | None, views: tuple[str, ...] = ()) -> dict:
        labelled, test = embeddings_of[views]
        labels_train = torch.tensor([code[i] for i in split.Id[train_cat.numpy()]])
        vq, vcentre = labelled[is_valid], centre_labelled[is_valid]
        v_scores = id_scores(vq, vcentre, labelled[train_cat], labels_train, len(vocab), blend)
        v_sight = sightings_of(vq, labelled[~is_valid & is_new]) if sightings else None
        threshold, valid_map = calibrate(v_scores, v_sight, valid_targets)
        row = {
            "run": run.name,
            "views": "+".join(("photo", *views)),
            "blend": blend,
            "sightings": sightings,
            "pseudo": tau,
            "threshold": round(threshold, 4),
            "valid_map5": round(valid_map, 4),
        }
        if tau is not None:  # validation photos as each other's extra catalogue: precision of the labels they would get
            chosen, chosen_ids = pseudo_rows(vq, v_scores, threshold, tau)
            truth_v = valid_targets[chosen]
            row["valid_pseudo"] = int(len(chosen))
            row["valid_pseudo_precision"] = round(float((chosen_ids == truth_v).float().mean()) if len(chosen) else 0.0, 4)
        labels_final = torch.tensor([final_code[i] for i in split.Id[~is_new.numpy()]])
        rows_final = labelled[~is_new]
        t_scores = id_scores(test, centre_test, rows_final, labels_final, len(ids), blend)
        t_sight = sightings_of(test, labelled[is_new]) if sightings else None
        if tau is not None:
            chosen, chosen_ids = pseudo_rows(test, t_scores, threshold, tau)
            row["test_pseudo"] = int(len(chosen))
            row["test_pseudo_precision"] = round(float((chosen_ids == test_targets[chosen]).float().mean()) if len(chosen) else 0.0, 4)
            # Each test photo ranked against the catalogue plus the other chosen test photos (never itself).
            extra = knn(test, test[chosen], chosen_ids, len(ids))
            mine = torch.zeros(len(test), dtype=torch.bool)
            mine[chosen] = True
            self_sims = torch.full((len(test), len(ids)), -2.0)
            for query in chosen.tolist():  # a chosen photo must not count itself: its own row is dropped
                others = chosen[chosen != query]
                self_sims[query] = knn(test[query : query + 1], test[others], chosen_ids[chosen != query], len(ids))[0]
            extra = torch.where(mine[:, None], self_sims, extra)
            t_scores = torch.maximum(t_scores, extra)
        new_score = torch.full((len(test),), threshold) if t_sight is None else t_sight.clamp(min=threshold)
        ranked = rank_with_new_whale(t_scores, new_score[:, None]).tolist()
        predictions = [apply_matches([NEW_WHALE if i == NEW_WHALE_TARGET else ids[i] for i in r], matches.get(n, [])) for n, r in zip(test_names, ranked)]
        truths = [truth[n] for n in test_names]
        new = [t == NEW_WHALE for t in truths]

        def part(keep: list[bool]) -> float:
            return round(map5_labels([p for p, k in zip(predictions, keep) if k], [t for t, k in zip(truths, keep) if k]), 4)

        row.update(
            test_map5=part([True] * len(truths)),
            test_catalogued=part([not n for n in new]),
            test_new_whale=part(new),
            new_whale_first=round(sum(p[0] == NEW_WHALE for p in predictions) / len(predictions), 4),
        )
        return row

    rows = []
    for views in view_sets:
        for blend in map(float, args.blends.split(",")):
            for sightings in (False, True):
                rows.append(evaluate(blend, sightings, None, views))
                print(json.dumps(rows[-1]), flush=True)
        for tau in map(float, args.pseudo.split(",")) if args.pseudo else ():
            for blend in (1.0, min(map(float, args.blends.split(",")))):
                rows.append(evaluate(blend, True, tau, views))
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
