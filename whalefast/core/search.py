"""Nearest catalogue photos by inner product: exact in chunks, or through an approximate faiss index for large catalogues.

The index (inverted lists over k-means cells, vectors kept as 8-bit scalar codes) only shortlists
photos; their scores are then computed exactly from the float16 rows, so an indexed catalogue ranks
its shortlist exactly as exact search would. faiss-cpu is optional (`pip install whalefast[scale]`):
without it every search is exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

INDEX_FROM = 4_000_000  # photos from which a catalogue is searched through the index: exact search takes about 60 ms per million photos on 2 cores (bench/catalogue_scale.py)
SHORTLIST = 128  # photos the index proposes per query, re-scored exactly
PROBE_SHARE = 0.8  # share of the inverted lists searched per query: whale embeddings are not clustered enough for fewer to keep recall@5 at 0.99
TRAIN_PER_CELL = 40  # k-means training photos per cell (faiss wants at least 39)
ADD_CHUNK = 65_536  # photos converted to float32 at a time while indexing


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class PhotoIndex:
    """An approximate inner-product index over unit float16 rows: IVF with 8-bit scalar quantisation, grown by `add`."""

    def __init__(self, vectors: np.ndarray, seed: int = 0):
        import faiss

        n, dims = vectors.shape
        self.cells = max(1, min(4096, int(math.sqrt(n))))
        self.quantizer = faiss.IndexFlatIP(dims)  # kept: the index refers to it
        self.index = faiss.IndexIVFScalarQuantizer(self.quantizer, dims, self.cells, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = rng.choice(n, size=min(n, self.cells * TRAIN_PER_CELL), replace=False)
        self.index.train(np.ascontiguousarray(vectors[np.sort(sample)], dtype=np.float32))
        self.index.nprobe = max(1, math.ceil(PROBE_SHARE * self.cells))
        self.add(vectors)

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, vectors: np.ndarray) -> None:
        """Index more rows; they get the next positions."""
        for start in range(0, len(vectors), ADD_CHUNK):
            self.index.add(np.ascontiguousarray(vectors[start : start + ADD_CHUNK], dtype=np.float32))

    def shortlist(self, queries: torch.Tensor, k: int = SHORTLIST) -> torch.Tensor:
        """(queries, k) positions of the rows nearest each query (-1 where the index found fewer)."""
        _, positions = self.index.search(np.ascontiguousarray(F.normalize(queries.float(), dim=1).cpu().numpy()), k)
        return torch.from_numpy(positions)


def shortlist_id_scores(queries: torch.Tensor, catalogue: torch.Tensor, labels: torch.Tensor, n_ids: int, positions: torch.Tensor) -> torch.Tensor:
    """Per id, the exact cosine similarity of each query to that id's nearest shortlisted photo (-2 where none was shortlisted)."""
    queries = F.normalize(queries.float(), dim=1)
    found = positions >= 0
    rows = positions.clamp(min=0)
    sims = torch.einsum("qd,qkd->qk", queries, catalogue[rows].float())  # catalogue rows are unit
    sims = torch.where(found, sims, torch.full_like(sims, -2.0))
    scores = torch.full((len(queries), n_ids), -2.0)
    return scores.scatter_reduce(1, labels[rows], sims, reduce="amax", include_self=True)
