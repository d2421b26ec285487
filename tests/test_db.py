"""The catalogue database: schema and migrations, idempotent imports in Darwin Core, merges, filters, appends that rewrite nothing."""

import sqlite3

import numpy as np
import pandas as pd
import pytest

from whalefast.core.errors import WhalefastError
from whalefast.db import schema
from whalefast.db.darwin_core import read_sightings
from whalefast.db.filters import PhotoFilter, distance_km, parse_filter
from whalefast.db.store import CatalogueStore, Conflict, PhotoRecord
from whalefast.match.catalogue import import_sightings
from whalefast.stages.catalogue import export_catalogue, history


def _photos(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"p{i}.jpg").write_bytes(f"photo {i}".encode())
    return folder


SIGHTINGS = """Image,Id,eventDate,locality,decimalLatitude,decimalLongitude,recordedBy,occurrenceID
p0.jpg,w_a,2019-07-14,Husavik,66.05,-17.35,Ann,occ-1
p1.jpg,w_a,2020-08-01,Husavik,66.06,-17.30,Ann,occ-2
p2.jpg,w_b,2019-06-30,Skjervoy,70.03,20.97,Bo,occ-3
p3.jpg,w_c,,Tromso,69.65,18.96,=cmd|' /C calc'!A0,occ-4
"""


@pytest.fixture
def store(tmp_path):
    with CatalogueStore(tmp_path / "catalogue.db") as s:
        yield s


@pytest.fixture
def sightings(tmp_path):
    _photos(tmp_path / "photos", 4)
    (tmp_path / "sightings.csv").write_text(SIGHTINGS)
    return tmp_path / "sightings.csv", tmp_path / "photos"


def test_a_new_database_gets_the_schema_and_keeps_its_version(tmp_path):
    with CatalogueStore(tmp_path / "c.db") as s:
        tables = {r[0] for r in s.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"meta", "individuals", "aliases", "photos", "embeddings", "queries", "decisions", "history"} <= tables
        assert s.query("PRAGMA journal_mode")[0][0] == "wal" and s.query("PRAGMA foreign_keys")[0][0] == 1
    with sqlite3.connect(tmp_path / "c.db") as db:
        assert schema.version(db) == schema.SCHEMA_VERSION and schema.migrate(db) == schema.SCHEMA_VERSION  # nothing left to do
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(WhalefastError, match="schema version 99 is newer than this whalefast's"):
        CatalogueStore(tmp_path / "c.db")
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 500)
    with pytest.raises(WhalefastError, match="junk.db: not a whalefast catalogue database, or damaged"):
        CatalogueStore(tmp_path / "junk.db")


def test_importing_the_same_file_again_changes_nothing(tmp_path, sightings):
    csv, photos = sightings
    first = import_sightings(tmp_path / "c.db", csv, photos)
    assert (first["added_photos"], first["new_ids"], first["individuals"], first["photos"]) == (4, 3, 3, 4)
    with CatalogueStore(tmp_path / "c.db") as s:
        revision, entries = s.revision, len(s.history())
    again = import_sightings(tmp_path / "c.db", csv, photos)
    assert (again["added_photos"], again["unchanged_photos"], again["new_ids"]) == (0, 4, 0)
    with CatalogueStore(tmp_path / "c.db") as s:
        assert s.revision == revision and len(s.history()) == entries
        sighting = s.describe("w_a")["sightings"][0]
        assert (sighting["event_date"], sighting["locality"], sighting["latitude"], sighting["photographer"]) == ("2019-07-14", "Husavik", 66.05, "Ann")

    (tmp_path / "relabel.csv").write_text("Image,Id\np2.jpg,w_a\n")
    with pytest.raises(Conflict, match="p2.jpg is already catalogued as w_b, not w_a .*pass --relabel"):
        import_sightings(tmp_path / "c.db", tmp_path / "relabel.csv", photos)
    moved = import_sightings(tmp_path / "c.db", tmp_path / "relabel.csv", photos, relabel=True)
    assert moved["relabelled"] == [{"photo": str(photos / "p2.jpg"), "from": "w_b", "to": "w_a"}]
    entries = history(tmp_path / "c.db")
    assert (
        entries[0]["summary"] == "0 photos, 0 new ids, 1 relabelled" and entries[1]["summary"] == "photo 3: w_b -> w_a (" + str(tmp_path / "relabel.csv") + ")"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("Image,Whale\np0.jpg,w_a\n", "expected columns Image,Id"),
        ("Image,Id\np0.jpg,=SUM(1)\n", "line 2: malformed Id '=SUM(1)'"),
        ("Image,Id,eventDate\np0.jpg,w_a,14/07/2019\n", "line 2: eventDate must be an ISO 8601 date"),
        ("Image,Id,decimalLatitude\np0.jpg,w_a,95\n", "line 2: decimalLatitude must be a number from -90 to 90, got '95'"),
        ("Image,Id,decimalLongitude\np0.jpg,w_a,east\n", "line 2: decimalLongitude must be a number from -180 to 180"),
        ("Image,Id\np0.jpg,w_a\np0.jpg,w_b\n", "line 3: p0.jpg listed twice"),
    ],
)
def test_bad_sightings_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "s.csv").write_text(text)
    with pytest.raises(WhalefastError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_sightings(tmp_path / "s.csv")


def test_merge_and_unmerge_round_trip(tmp_path, sightings):
    csv, photos = sightings
    import_sightings(tmp_path / "c.db", csv, photos)
    with CatalogueStore(tmp_path / "c.db") as s:
        before = sorted(tuple(r) for r in s.query("SELECT id, individual FROM photos"))
        assert s.merge("w_a", "w_b") == {"kept": "w_a", "merged": "w_b", "photos": 1}
        assert s.individual("w_b") == "w_a" and s.describe("w_b")["id"] == "w_a" and "w_b" in s.describe("w_a")["aliases"]
        assert {r[0] for r in s.query("SELECT DISTINCT individual FROM photos")} == {"w_a", "w_c"}
        with pytest.raises(WhalefastError, match="already one individual"):
            s.merge("w_a", "w_b")
        assert s.unmerge("w_b") == {"restored": "w_b", "from": "w_a", "photos": 1}
        assert sorted(tuple(r) for r in s.query("SELECT id, individual FROM photos")) == before and s.individual("w_b") == "w_b"
        assert s.rename("w_c", "w_tromso") == {"from": "w_c", "to": "w_tromso"}
        assert s.individual("w_c") == "w_tromso" and s.describe("w_c")["sightings"][0]["locality"] == "Tromso"
        with pytest.raises(WhalefastError, match="w_a is already an individual or an alias"):
            s.rename("w_b", "w_a")
        assert [h["action"] for h in s.history()][:3] == ["rename", "unmerge", "merge"]


def test_filters_let_through_exactly_the_photos_asked_for(tmp_path, sightings):
    csv, photos = sightings
    import_sightings(tmp_path / "c.db", csv, photos)
    with CatalogueStore(tmp_path / "c.db") as s:
        path_of = {r[0]: r[1] for r in s.query("SELECT id, path FROM photos")}

        def names(f):
            return sorted(path_of[i] for i in s.filtered_ids(f))

        assert names(parse_filter(["locality=Husavik"])) == ["photos/p0.jpg", "photos/p1.jpg"]
        assert names(parse_filter(since="2019-07-01")) == ["photos/p0.jpg", "photos/p1.jpg"]
        assert names(parse_filter(until="2019-07")) == ["photos/p0.jpg", "photos/p2.jpg"]  # a month means all of it
        assert names(parse_filter(["recordedBy=Bo"], until="2019-12-31")) == ["photos/p2.jpg"]
        assert names(parse_filter(near="69.7,19.0", within_km=20)) == ["photos/p3.jpg"]  # Tromso; Skjervoy is about 100 km away
        assert names(PhotoFilter()) == sorted(path_of.values())
    assert distance_km(0, 0, 0, 1) == pytest.approx(111.195, abs=0.01) and distance_km(90, 0, -90, 0) == pytest.approx(20015.1, abs=0.1)
    for bad, message in (
        (dict(where=["place=Husavik"]), "not a catalogue field"),
        (dict(where=["locality"]), "--where must be KEY=VALUE"),
        (dict(since="July 2019"), "--since must be a date"),
        (dict(near="66,-17"), "--near LAT,LON and --within-km KM go together"),
        (dict(near="north", within_km=3), "--near must be LAT,LON"),
    ):
        with pytest.raises(WhalefastError, match=message):
            parse_filter(**bad)


def test_adding_a_photo_appends_and_rewrites_nothing(tmp_path):
    folder = _photos(tmp_path / "photos", 1)
    rng = np.random.default_rng(0)
    with CatalogueStore(tmp_path / "c.db") as s:
        records = [PhotoRecord(folder / "p0.jpg", f"digest{i:05d}", f"w_{i // 3:04d}", "bench") for i in range(3000)]
        s.add_photos(records, model="m", vectors=rng.standard_normal((3000, 512)))
        s.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        main = (tmp_path / "c.db").read_bytes()
        s.add_photos([PhotoRecord(folder / "p0.jpg", "one-more", "w_new", "bench")], model="m", vectors=rng.standard_normal((1, 512)))
        assert (tmp_path / "c.db").read_bytes() == main  # until a checkpoint the change sits in the write-ahead log alone
        s.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        after = (tmp_path / "c.db").read_bytes()
        page = s.query("PRAGMA page_size")[0][0]
        changed = sum(after[i : i + page] != main[i : i + page] for i in range(0, len(after), page))
        assert len(main) > 4_000_000 and len(after) - len(main) <= 4 * page  # about one photo's bytes (its 1 KB float16 embedding and rows)
        assert changed <= 16  # a handful of the file's thousand pages: the row, its embedding, the indexes, the history line
        rows = s.rows("m")
        assert len(rows.photo_ids) == 3001 and rows.vectors.dtype == np.float16 and rows.vectors.shape[1] == 512


def test_export_writes_darwin_core_columns_spreadsheet_safe_and_photo_folders(tmp_path, sightings):
    csv, photos = sightings
    import_sightings(tmp_path / "c.db", csv, photos)
    result = export_catalogue(tmp_path / "c.db", tmp_path / "out.csv", tmp_path / "by-id")
    table = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)
    assert result == {"out": str(tmp_path / "out.csv"), "photos": 4, "individuals": 3, "copied": 4, "missing": 0}
    assert list(table.columns[:9]) == ["Image", "Id", "eventDate", "eventTime", "locality", "decimalLatitude", "decimalLongitude", "recordedBy", "occurrenceID"]
    assert table.set_index("occurrenceID").recordedBy["occ-4"] == "'=cmd|' /C calc'!A0"  # never a formula in a spreadsheet
    assert sorted(p.relative_to(tmp_path / "by-id").as_posix() for p in (tmp_path / "by-id").rglob("*.jpg")) == [
        "w_a/p0.jpg",
        "w_a/p1.jpg",
        "w_b/p2.jpg",
        "w_c/p3.jpg",
    ]
    reimported = tmp_path / "again.csv"
    table.assign(Image=[p.split("/")[-1] for p in table.Image]).to_csv(reimported, index=False)
    (tmp_path / "again.csv").write_text((tmp_path / "again.csv").read_text().replace("'=cmd", "=cmd"))
    assert import_sightings(tmp_path / "c.db", reimported, photos)["added_photos"] == 0  # an export imports back as the same photos
    assert export_catalogue(tmp_path / "c.db", tmp_path / "out.csv", tmp_path / "by-id")["copied"] == 0  # again: nothing copied twice


def test_exported_photo_folders_keep_two_photos_of_one_file_name(tmp_path):
    for folder, data in (("a", b"first photo"), ("b", b"second photo")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "IMG_0001.jpg").write_bytes(data)
        (tmp_path / f"{folder}.csv").write_text("Image,Id\nIMG_0001.jpg,w_a\n")
        import_sightings(tmp_path / "c.db", tmp_path / f"{folder}.csv", tmp_path / folder)
    (tmp_path / "c.csv").write_text("Image,Id\nIMG_0001.jpg,w_b\n")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "IMG_0001.jpg").write_bytes(b"third photo")
    import_sightings(tmp_path / "c.db", tmp_path / "c.csv", tmp_path / "c")
    (tmp_path / "c" / "IMG_0001.jpg").unlink()  # a photo that has gone from disk
    result = export_catalogue(tmp_path / "c.db", tmp_path / "out.csv", tmp_path / "by-id")
    copies = sorted((tmp_path / "by-id").rglob("*.jpg"))
    assert (result["copied"], result["missing"]) == (2, 1) and len(copies) == 2
    assert sorted(p.read_bytes() for p in copies) == [b"first photo", b"second photo"] and {p.parent.name for p in copies} == {"w_a"}


def test_photo_paths_follow_the_photo_root(tmp_path, sightings):
    csv, photos = sightings
    import_sightings(tmp_path / "c.db", csv, photos)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    photos.rename(moved / "photos")
    with CatalogueStore(tmp_path / "c.db") as s:
        assert not s.describe("w_b")["sightings"][0]["path"].startswith(str(moved))
        s.set_photo_root(moved)
        assert s.describe("w_b")["sightings"][0]["path"] == str(moved / "photos" / "p2.jpg") and (moved / "photos" / "p2.jpg").is_file()
