"""Where new_whale goes in a submission: the calibrated threshold against a target share of first answers, on one finished run.

The test photos are embedded and scored once; each rule then places new_whale and the submission is
scored as submit would write it (hash-matched training ids first) against test_answers.csv:
- calibrated: the threshold fitted on the validation photos (calibration.json, today's rule);
- share S: the threshold under which a share S of the test photos' best scores fall, so that S of
  first answers are new_whale (Happywhale 2022's first place; 27-30 % of test photos were new whales
  in the 2018 data and the 2019 winners' estimates);
- blend S: the mean of the two thresholds (ranking.batch_threshold: what submit --new-whale-share S does).

    python bench/new_whale_rule.py --run WORK/models/arcface-predicted --data WORK/data    # WORK: what bench/real_flukes.py left
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from whalefast import NEW_WHALE
from whalefast.core.labels import read_labels
from whalefast.core.ranking import NEW_WHALE_TARGET, batch_threshold, map5_labels, rank_with_new_whale
from whalefast.data.layout import test_images
from whalefast.data.prepared import image_cache
from whalefast.match.matcher import Matcher
from whalefast.stages.submit import apply_matches, hash_matches


def share_threshold(best: torch.Tensor, share: float) -> float:
    """The score under which `share` of the photos' best scores fall."""
    return float(torch.quantile(best.float(), share))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the run's data folder, prepared, with test_answers.csv")
    parser.add_argument("--shares", default="0.24,0.27,0.30,0.40,0.50,0.60")
    args = parser.parse_args()
    matcher = Matcher(args.run)
    names = test_images(args.data)
    images = image_cache(args.data, args.data / "prepared", "test", names, matcher.spec)
    readable = [n for n in names if n not in images.problems]
    scores = matcher.scores([images[n] for n in readable])
    best = scores.max(1).values
    truth = dict(zip(*read_labels(args.data / "test_answers.csv")[["Image", "Id"]].T.values))
    matches = hash_matches(args.data / "prepared")

    def test_map5(threshold: float) -> tuple[float, float]:
        ranked = rank_with_new_whale(scores, threshold, 5).tolist()
        rows = [[NEW_WHALE if i == NEW_WHALE_TARGET else matcher.ids[i] for i in idx] for idx in ranked]
        predictions = [apply_matches(r, matches.get(n, [])) for n, r in zip(readable, rows)]
        first_new = sum(p[0] == NEW_WHALE for p in predictions) / len(predictions)
        return map5_labels(predictions, [truth[n] for n in readable]), first_new

    rules = {"calibrated": matcher.threshold}
    for share in map(float, args.shares.split(",")):
        rules[f"share {share:.2f}"] = share_threshold(best, share)
        rules[f"blend {share:.2f}"] = batch_threshold(matcher.threshold, best, share)
    print(f"{args.run.name}: {len(readable)} test photos, {sum(v == NEW_WHALE for v in truth.values()) / len(truth):.1%} of them new whales")
    print(f"{'rule':<14} {'threshold':>9} {'new_whale first':>16} {'test MAP@5':>11}")
    for name, threshold in rules.items():
        map5, first_new = test_map5(threshold)
        print(f"{name:<14} {threshold:>9.4f} {first_new:>16.1%} {map5:>11.4f}")


if __name__ == "__main__":
    main()
