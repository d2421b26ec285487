"""Where a user waits for one photo: `whalefast predict one.jpg` cold, and each stage warm in one process.

On a finished run (the demo's by default), on a private copy of its models folder:
- cold: `whalefast --help` and `whalefast predict PHOTO` as a user types them, wall time, median of
  --repeats; with --compare TREE, the same commands from another whalefast source tree (say the
  previous commit, `git worktree add /tmp/before HEAD~1`), interleaved, and the ratio;
- warm, in this process: importing the matching code, loading the run (network, catalogue), and per
  photo decode and crop, the network, the search; then the review app's path for one uploaded photo
  (add it to the queue, embed it, rank its candidates).

    whalefast demo && python bench/latency.py
    python bench/latency.py --models-dir models --model flukes --photos data/test --compare /tmp/before
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wall(command: list[str], tree: Path | None = None) -> float:
    """Seconds `command` takes from start to exit, with `tree` first on the import path."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def cold(photo: Path, models: Path, model: str, repeats: int, compare: Path | None) -> list[tuple[str, float, float | None]]:
    """(command, median seconds here, median seconds from the compared tree), measured alternately."""
    commands = {
        "python -c 'import torch' (the floor)": [sys.executable, "-c", "import torch"],
        "whalefast --help": [sys.executable, "-m", "whalefast", "--help"],
        "whalefast predict PHOTO": [sys.executable, "-m", "whalefast", "predict", str(photo), "--model", model, "--models-dir", str(models)],
    }
    here = Path(__file__).resolve().parents[1]
    rows = []
    for name, command in commands.items():
        wall(command, here)  # warm the page cache
        ours, theirs = [], []
        for _ in range(repeats):
            ours.append(wall(command, here))
            if compare is not None:
                theirs.append(wall(command, compare))
        rows.append((name, statistics.median(ours), statistics.median(theirs) if theirs else None))
    return rows


def warm(photos: list[Path], models: Path, model: str) -> dict[str, float]:
    """Seconds per stage in this process (per photo: the median over `photos` after the first)."""
    start = time.perf_counter()
    from whalefast.match.matcher import Matcher
    from whalefast.review.logic import Review

    figures = {"import": time.perf_counter() - start}
    start = time.perf_counter()
    matcher = Matcher(models / model)
    figures["load run"] = time.perf_counter() - start
    stages = {"decode and crop": [], "network": [], "search": []}
    for photo in photos:
        start = time.perf_counter()
        array, problem = matcher.loader.load(photo)
        assert not problem, problem
        decoded = time.perf_counter()
        outputs = matcher.outputs([array])
        embedded = time.perf_counter()
        matcher.rank(matcher.id_scores(outputs))
        searched = time.perf_counter()
        for stage, seconds in zip(stages, (decoded - start, embedded - decoded, searched - embedded)):
            stages[stage].append(seconds)
    figures |= {stage: statistics.median(times[1:] or times) for stage, times in stages.items()}
    review, times = Review(models / model), []
    for photo in photos:
        start = time.perf_counter()
        query = review.add(photo.name, photo.read_bytes())
        review.candidates(query.qid, 5)
        times.append(time.perf_counter() - start)
    figures["review app: upload to candidates"] = statistics.median(times[1:] or times)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--model", default="demo-arcface")
    parser.add_argument("--photos", type=Path, default=Path("data/demo/test"), help="a folder of query photos")
    parser.add_argument("--count", type=int, default=11, help="photos for the warm figures")
    parser.add_argument("--repeats", type=int, default=5, help="cold runs of each command")
    parser.add_argument("--compare", type=Path, help="another whalefast source tree to time the cold commands of, alternately")
    args = parser.parse_args()
    if not (args.models_dir / args.model).is_dir():
        sys.exit(f"{args.models_dir / args.model}: no such run; run `whalefast demo` first, or pass --models-dir and --model")
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.count]
    if not photos:
        sys.exit(f"{args.photos}: no photos")
    with tempfile.TemporaryDirectory() as scratch:  # the review path writes to the catalogue: never to the user's
        models = Path(scratch) / "models"
        shutil.copytree(args.models_dir, models)
        print(f"{'cold (wall s, median of ' + str(args.repeats) + ')':<40} {'here':>7} {'compared':>9} {'ratio':>6}")
        for name, ours, theirs in cold(photos[0], models, args.model, args.repeats, args.compare):
            print(f"{name:<40} {ours:>7.2f} {'' if theirs is None else f'{theirs:>9.2f}'} {'' if theirs is None else f'{ours / theirs:>6.2f}'}")
        print(f"\n{'warm, in one process':<40} {'s':>7}")
        for stage, seconds in warm(photos, models, args.model).items():
            print(f"{stage:<40} {seconds:>7.3f}")


if __name__ == "__main__":
    main()
