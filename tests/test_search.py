"""Searching the catalogue: exact id scores in chunks, appends that match a fresh load, the optional faiss index, and the projection stored embeddings go through."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from whalefast.core import ranking
from whalefast.core.ranking import cosine_id_scores, photo_similarities
from whalefast.core.search import faiss_available
from whalefast.db.store import CatalogueStore, PhotoRecord
from whalefast.runs.catalogue import Catalogue, Projection


def _clustered(rng, whales, per_whale, dims=64, noise=0.5):
    """Unit float16 rows: `per_whale` noisy photos of each whale, and their labels."""
    centres = F.normalize(torch.from_numpy(rng.standard_normal((whales, dims))).float(), dim=1)
    labels = torch.arange(whales).repeat_interleave(per_whale)
    rows = F.normalize(centres[labels] + noise / np.sqrt(dims) * torch.from_numpy(rng.standard_normal((len(labels), dims))).float(), dim=1)
    return rows.half(), labels, centres


def _reference(queries, rows, labels, n_ids):
    sims = F.normalize(queries.double(), dim=1) @ rows.double().T
    return torch.stack([torch.where(labels == i, sims, torch.tensor(-2.0, dtype=torch.float64)).amax(1) for i in range(n_ids)], 1)


@pytest.mark.parametrize("n_queries", [3, 40])  # float16 rows read as they are, and converted chunk by chunk
def test_exact_id_scores_are_each_ids_nearest_photo_across_chunks(monkeypatch, n_queries):
    monkeypatch.setattr(ranking, "CHUNK", 7)
    rows, labels, _ = _clustered(np.random.default_rng(0), whales=6, per_whale=5)
    queries = torch.randn(n_queries, 64)
    scores = cosine_id_scores(queries, rows, labels, n_ids=7)
    expected = _reference(queries, rows, labels, 7)
    assert scores.shape == (n_queries, 7) and torch.allclose(scores.double(), expected, atol=2e-3)
    assert (scores[:, 6] == -2).all()  # id 6 has no photo
    assert torch.allclose(photo_similarities(queries, rows).double(), F.normalize(queries.double(), dim=1) @ rows.double().T, atol=2e-3)


def _store_with(path, rows, labels, names=None):
    store = CatalogueStore(path)
    names = names or [f"w_{int(i):03d}" for i in labels]
    records = [PhotoRecord(path.parent / f"p{i}.jpg", f"digest-{path.stem}-{i}", name, "test") for i, name in enumerate(names)]
    store.add_photos(records, model="m", vectors=rows.float().numpy())
    return store


def test_appended_photos_score_as_a_fresh_load_and_rarely_copy(tmp_path):
    rng = np.random.default_rng(1)
    rows, labels, centres = _clustered(rng, whales=10, per_whale=4)
    store = _store_with(tmp_path / "c.db", rows, labels)
    loaded = store.rows("m")
    catalogue = Catalogue.from_rows(loaded)
    storage = catalogue._rows.data_ptr()
    more, _, _ = _clustered(rng, whales=2, per_whale=2)
    records = [PhotoRecord(tmp_path / f"q{i}.jpg", f"more-{i}", name, "test") for i, name in enumerate(["w_001", "w_new", "w_new", "w_002"])]
    store.add_photos(records, model="m", vectors=more.float().numpy())
    newer = store.rows("m", after=loaded.last)
    assert len(newer.photo_ids) == 4 and newer.individuals == ["w_001", "w_new", "w_new", "w_002"]
    catalogue.append(newer)
    fresh = Catalogue.from_rows(store.rows("m"))
    queries = torch.cat([centres, more.float()])
    assert len(catalogue) == len(fresh) == 44 and catalogue.ids == fresh.ids and catalogue.ids[-1] == "w_new"
    assert catalogue.photos == fresh.photos and catalogue.photo_ids.tolist() == fresh.photo_ids.tolist()
    assert torch.equal(catalogue.scores(queries), fresh.scores(queries))
    assert catalogue._rows.data_ptr() == storage  # the load left room: appending copied nothing
    store.close()


def test_only_a_change_to_existing_labels_or_embeddings_bumps_the_labels_revision(tmp_path):
    rows, labels, _ = _clustered(np.random.default_rng(2), whales=3, per_whale=2)
    store = _store_with(tmp_path / "c.db", rows, labels)
    before = store.labels_revision
    store.add_photos([PhotoRecord(tmp_path / "x.jpg", "extra", "w_000", "test")], model="m", vectors=rows[:1].float().numpy())
    assert store.labels_revision == before  # an append: readers catch up without reloading
    store.rename("w_001", "w_renamed")
    assert store.labels_revision > before
    renamed = store.labels_revision
    store.merge("w_000", "w_002")
    assert store.labels_revision > renamed
    merged = store.labels_revision
    store.put_embeddings("m", [int(store.rows("m").photo_ids[0])], rows[:1].float().numpy())
    assert store.labels_revision > merged  # a replaced embedding
    store.close()


def test_stored_embeddings_are_unit_rows(tmp_path):
    rows = torch.tensor([[3.0, 4.0], [0.0, 0.5]])
    store = _store_with(tmp_path / "c.db", rows, torch.tensor([0, 1]))
    assert np.allclose(store.rows("m").vectors.astype(np.float32), [[0.6, 0.8], [0.0, 1.0]], atol=1e-3)
    store.close()


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu is not installed (pip install whalefast[scale])")
def test_the_index_ranks_clustered_whales_as_exact_search_and_grows_by_append(tmp_path):
    rng = np.random.default_rng(3)
    rows, labels, centres = _clustered(rng, whales=400, per_whale=5)
    store = _store_with(tmp_path / "c.db", rows, labels)
    loaded = store.rows("m")
    exact, indexed = Catalogue.from_rows(loaded), Catalogue.from_rows(loaded)
    assert not indexed.build_index() and indexed.build_index(size=0) and len(indexed.index) == 2000  # indexed only when asked below INDEX_FROM
    queries = F.normalize(centres[:100] + 0.5 / 8 * torch.randn(100, 64), dim=1)
    exact_scores, indexed_scores = exact.scores(queries), indexed.scores(queries)
    exact_top, indexed_top = exact_scores.topk(5, 1).indices, indexed_scores.topk(5, 1).indices
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact_top.tolist(), indexed_top.tolist())])
    assert recall >= 0.99 and (indexed_top[:, 0] == torch.arange(100)).float().mean() > 0.95
    found = indexed_scores > -2  # an id is scored by its nearest shortlisted photo, exactly: never above exact search, equal for the best id
    assert found.sum() >= 100 * 5 and (indexed_scores[found] <= exact_scores[found] + 1e-6).all()
    assert torch.allclose(indexed_scores.amax(1), exact_scores.amax(1))
    new = F.normalize(torch.randn(1, 64), dim=1)
    store.add_photos([PhotoRecord(tmp_path / "new.jpg", "new", "w_new", "test")], model="m", vectors=new.numpy())
    indexed.append(store.rows("m", after=loaded.last))
    assert len(indexed.index) == 2001 and indexed.ids[indexed.scores(new).argmax()] == "w_new"
    store.close()


@pytest.mark.parametrize("photos", [40, 400])  # fewer photos than dimensions, and more
def test_a_projection_keeps_what_lies_in_its_dimensions(photos):
    rng = np.random.default_rng(4)
    basis = torch.linalg.qr(torch.from_numpy(rng.standard_normal((128, 8))).float())[0]  # the photos span 8 of 128 dimensions
    x = F.normalize(torch.from_numpy(rng.standard_normal((photos, 8))).float() @ basis.T + 0.3, dim=1)
    projection = Projection.fit(x, 9)  # 8 directions around the mean, and 1 to spare
    assert projection.components.shape == (128, 9)
    assert torch.allclose(projection.components.T @ projection.components, torch.eye(9), atol=1e-4)
    centred = x - projection.mean
    expected = F.normalize(centred, dim=1) @ F.normalize(centred, dim=1).T
    projected = projection(x)
    assert torch.allclose(projected @ projected.T, expected, atol=1e-3)  # nothing of the photos was lost
    assert Projection.fit(x, 128) is None and Projection.fit(x[:5], 9) is None  # no smaller, or too few photos
