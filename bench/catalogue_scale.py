"""How the catalogue database scales: synthetic 512-dimension float16 embeddings at 10 000, 100 000 and 1 000 000 photos.

Per size it builds a catalogue database (cached under --work), then, in a fresh process so memory is
its own: the file's size, the time to load it and the RAM it takes (the process's peak with the
catalogue loaded, and then with its index too), the time to add one photo (the
database transaction and the in-memory append, without the network), the latency of one query
(top 5 ids) by exact search and through the faiss index, and the index's recall@5: the share of
exact search's top 5 ids the index also ranks in its top 5, for photos of catalogued whales and of
whales never seen; and how often a catalogued whale's photo finds its own whale in the top 5, exactly
and through the index. Goal on 2 cores at 1 000 000 photos: < 200 ms a query, recall@5 >= 0.99, adding
a photo < 50 ms, RAM < 2 GB.

Photos are noisy copies of one centre per whale (about five a whale, as in the Kaggle and Happywhale
catalogues), the centres drawn with a decaying spectrum like a PCA's, the noise set so that two photos of one whale have
cosine about 0.55, as the flukes recipe's embeddings do.

    python bench/catalogue_scale.py                        # 10k, 100k, 1M (about 15 minutes, 3 GB of disk under /tmp)
    python bench/catalogue_scale.py --sizes 10000 100000   # quicker
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIMS = 512
PHOTOS_PER_WHALE = 5
NOISE = 0.9  # noise norm relative to the centre's: two photos of a whale have cosine about 1 / (1 + NOISE**2)
BATCH = 50_000
MODEL = "synthetic"


def centres(rng: np.random.Generator, n: int) -> np.ndarray:
    spectrum = 1.0 / np.sqrt(1.0 + np.arange(DIMS) / 32.0)
    x = rng.standard_normal((n, DIMS)).astype(np.float32) * spectrum
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def photos_of(rng: np.random.Generator, centre_rows: np.ndarray) -> np.ndarray:
    noise = rng.standard_normal(centre_rows.shape).astype(np.float32) * (NOISE / np.sqrt(DIMS))
    x = centre_rows + noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def whale(i: int) -> str:
    return f"w_{i:07x}"


def build(path: Path, n: int, seed: int = 0) -> None:
    """A catalogue database of `n` synthetic photos, written through the store as `catalogue import` would, then the whale centres beside it."""
    from whalefast.db.store import CatalogueStore, PhotoRecord

    rng = np.random.default_rng(seed)
    whales = max(1, n // PHOTOS_PER_WHALE)
    centre_rows = centres(rng, whales)
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    with CatalogueStore(partial) as store:
        for start in range(0, n, BATCH):
            count = min(BATCH, n - start)
            label = rng.integers(0, whales, count)
            records = [
                PhotoRecord(Path(f"photos/{start + i:07d}.jpg"), hashlib.sha256(str(start + i).encode()).hexdigest(), whale(int(w)), "synthetic")
                for i, w in enumerate(label)
            ]
            store.add_photos(records, model=MODEL, vectors=photos_of(rng, centre_rows[label]))
            print(f"  {start + count} / {n} photos", flush=True)
        store.query("PRAGMA wal_checkpoint(TRUNCATE)")
    np.save(path.with_suffix(".centres.npy"), centre_rows)
    os.replace(partial, path)


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def median_ms(step, repeats: int) -> float:
    step()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def top5(catalogue, queries) -> list[set[str]]:
    scores = catalogue.scores(queries)
    return [{catalogue.ids[i] for i in row} for row in scores.topk(5, dim=1).indices.tolist()]


def rows_last(store) -> int:
    return store.query("SELECT max(rowid) FROM embeddings")[0][0]


def measure(path: Path, queries_per_kind: int, seed: int = 1) -> dict:
    """The figures for one database, measured in this process."""
    import torch

    from whalefast.db.store import CatalogueStore, PhotoRecord
    from whalefast.runs.catalogue import Catalogue

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(seed)
    centre_rows = np.load(path.with_suffix(".centres.npy"))
    known_whales = rng.integers(0, len(centre_rows), queries_per_kind)
    known = torch.from_numpy(photos_of(rng, centre_rows[known_whales]).astype(np.float32))
    unknown = torch.from_numpy(photos_of(rng, centres(rng, queries_per_kind)).astype(np.float32))
    first_centre = centre_rows[:1].copy()  # what added photos are drawn from; the rest would only weigh on the peak
    del centre_rows
    baseline = rss_gb()

    start = time.perf_counter()
    store = CatalogueStore(path)
    rows = store.rows(MODEL)
    catalogue = Catalogue.from_rows(rows)
    load_s = time.perf_counter() - start
    catalogue_gb = rss_gb() - baseline
    loaded_peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    exact_catalogue_photos = rows.photo_ids
    del rows

    exact_ms = median_ms(lambda: catalogue.scores(known[:1]).topk(5), 10)
    exact = {kind: top5(catalogue, q) for kind, q in (("known", known), ("unknown", unknown))}
    start = time.perf_counter()
    catalogue.build_index(size=0)
    index_s = time.perf_counter() - start
    indexed_gb = rss_gb() - baseline
    index_ms = median_ms(lambda: catalogue.scores(known[:1]).topk(5), 50)
    recall, indexed = {}, {"known": top5(catalogue, known), "unknown": top5(catalogue, unknown)}
    for kind in ("known", "unknown"):
        recall[kind] = statistics.mean(len(t & f) / 5 for t, f in zip(exact[kind], indexed[kind]))
    own = [whale(int(w)) for w in known_whales]
    own_found = {how: statistics.mean(w in top for w, top in zip(own, found["known"])) for how, found in (("exact", exact), ("index", indexed))}

    added, last = [0], [rows_last(store)]

    def add_one():  # what the review app does for a confirmed photo: one transaction, then the matcher's append
        i = added[0] = added[0] + 1
        record = PhotoRecord(Path(f"photos/added-{i}.jpg"), hashlib.sha256(f"added-{i}".encode()).hexdigest(), whale(0), "review")
        store.add_photos([record], model=MODEL, vectors=photos_of(rng, first_centre))
        newer = store.rows(MODEL, after=last[0])
        catalogue.append(newer)
        last[0] = newer.last

    add_ms = median_ms(add_one, 20)
    assert len(catalogue) == len(catalogue.index) == len(exact_catalogue_photos) + added[0], "every added photo is in the catalogue and its index"
    store.query("DELETE FROM photos WHERE source = 'review'")  # the cached database as it was built
    store.close()
    return {
        "photos": len(exact_catalogue_photos),
        "whales": len(catalogue.ids),
        "disk_gb": path.stat().st_size / 1e9,
        "load_s": load_s,
        "catalogue_gb": catalogue_gb,
        "with_index_gb": indexed_gb,
        "peak_loaded_gb": loaded_peak_gb,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "index_build_s": index_s,
        "exact_ms": exact_ms,
        "index_ms": index_ms,
        "recall_known": recall["known"],
        "recall_unknown": recall["unknown"],
        "own_whale_exact": own_found["exact"],
        "own_whale_index": own_found["index"],
        "add_ms": add_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/whalefast-catalogue-scale"))
    parser.add_argument("--queries", type=int, default=200, help="queries of each kind (catalogued whale, unseen whale) for recall")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.queries)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.sizes:
        path = args.work / f"catalogue-{n}.db"
        if not path.exists():
            print(f"building {path}", flush=True)
            build(path, n)
        out = subprocess.run([sys.executable, __file__, "--measure", str(path), "--queries", str(args.queries)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(
        f"\n{'photos':>9} {'disk GB':>8} {'load s':>7} {'RAM GB':>7} {'+index':>7} {'peak':>6} {'+index':>7} {'build s':>8} {'exact ms':>9} {'index ms':>9} "
        f"{'recall known':>13} {'unseen':>7} {'own whale exact':>16} {'index':>6} {'add ms':>7}"
    )
    for r in results:
        print(
            f"{r['photos']:>9} {r['disk_gb']:>8.2f} {r['load_s']:>7.1f} {r['catalogue_gb']:>7.2f} {r['with_index_gb'] - r['catalogue_gb']:>7.2f} "
            f"{r['peak_loaded_gb']:>6.2f} {r['peak_rss_gb']:>7.2f} {r['index_build_s']:>8.1f} {r['exact_ms']:>9.1f} {r['index_ms']:>9.1f} {r['recall_known']:>13.3f} "
            f"{r['recall_unknown']:>7.3f} {r['own_whale_exact']:>16.3f} {r['own_whale_index']:>6.3f} {r['add_ms']:>7.1f}"
        )


if __name__ == "__main__":
    main()
