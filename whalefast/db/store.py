"""The catalogue database: individuals, their photos and sightings, embeddings per model, review decisions and an append-only history.

One SQLite file (WAL mode, foreign keys, a schema version with migrations) that a team backs up with
`sqlite3 catalogue.db ".backup copy.db"`. Every change is one transaction, so a crash leaves the old
state or the new; two processes on one file wait for each other's writes (busy timeout) and a
conflicting decision is refused with a message. The class is the small interface the rest of
whalefast uses: a server database could stand in behind the same methods.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from whalefast.core.errors import StorageError, WhalefastError
from whalefast.core.files import FULL_DISK, NOT_WRITABLE, os_error_text
from whalefast.core.labels import ID_RULE, is_valid_id
from whalefast.db import schema
from whalefast.db.filters import PhotoFilter, distance_km

if TYPE_CHECKING:
    import pandas as pd

METADATA = ("occurrence_id", "event_date", "event_time", "locality", "latitude", "longitude", "photographer", "side", "quality")
IN_CHUNK = 500  # values in one IN (...) list: well under SQLite's limit on parameters
FINAL = ("same", "new")  # review decisions that put a photo in the catalogue; a later one is refused


class Conflict(WhalefastError):
    """A change the catalogue refuses because it disagrees with what is there (another reviewer decided first, a photo already has another id)."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class PhotoRecord:
    """A photo to catalogue: where it is, its digest, the individual it shows (None: not identified) and its sighting's metadata."""

    path: Path
    digest: str
    individual: str | None
    source: str
    metadata: dict = field(default_factory=dict)  # METADATA columns


@dataclass
class Added:
    """What adding photos changed."""

    added: list[int] = field(default_factory=list)  # photo ids
    unchanged: list[int] = field(default_factory=list)
    relabelled: list[tuple[str, str, str]] = field(default_factory=list)  # (path, old id, new id)
    new_ids: list[str] = field(default_factory=list)
    kept: list[tuple[str, str, str]] = field(default_factory=list)  # (path, id in the catalogue, id given): left as the catalogue has it


@dataclass
class Rows:
    """The catalogue of one model: identified photos with an embedding, in photo order."""

    photo_ids: np.ndarray
    individuals: list[str]
    paths: list[str]
    buffer: np.ndarray  # (photos and room for more, dims) float16
    last: int = 0  # the newest embedding read: pass as `after` to read only later ones

    @property
    def vectors(self) -> np.ndarray:
        return self.buffer[: len(self.photo_ids)]


def room_for(photos: int) -> int:
    """Rows to allocate for `photos` embeddings: a sixteenth more and at least 1 024 spare, so that adding photos one by one rarely copies them."""
    return photos + photos // 16 + 1024


class CatalogueStore:
    """The catalogue in one SQLite file; safe to call from several threads of one process, and from several processes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        except (OSError, sqlite3.Error) as e:
            raise StorageError(f"{self.path}: cannot open the catalogue database ({e})") from None
        self.db.row_factory = sqlite3.Row
        self.db.create_function("distance_km", 4, distance_km, deterministic=True)
        try:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA synchronous = FULL")  # an acknowledged decision survives a power cut too, not only a crash
            started = schema.migrate(self.db)
        except sqlite3.DatabaseError as e:
            raise _storage_error(e, self.path) or WhalefastError(f"{self.path}: not a whalefast catalogue database, or damaged ({e})") from None
        except ValueError as e:
            raise WhalefastError(f"{self.path}: {e}; upgrade whalefast to open it") from None
        if started == 0:
            self._set_meta("photo_root", ".")
            self._set_meta("revision", "0")

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def transaction(self):
        """One write transaction, taken at once (BEGIN IMMEDIATE): all of it or none, and the catalogue's revision moves on."""
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise StorageError(f"{self.path}: the catalogue is busy or cannot be written ({e})") from None
            before = self.db.total_changes
            try:
                yield self.db
                if self.db.total_changes != before:
                    self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'")
                self.db.execute("COMMIT")
            except BaseException as e:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                if isinstance(e, sqlite3.DatabaseError) and (storage := _storage_error(e, self.path)):
                    raise storage from None
                raise

    def _set_meta(self, key: str, value: str) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _meta(self, key: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def query(self, sql: str, params=()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, params).fetchall()

    @property
    def revision(self) -> int:
        """A number that moves on with every change: another process's too."""
        return int(self._meta("revision") or 0)

    # Where photos live

    @property
    def photo_root(self) -> Path:
        """The folder photo paths are stored relative to (relative to the database's own folder, by default that folder itself)."""
        root = Path(self._meta("photo_root") or ".")
        return root if root.is_absolute() else (self.path.parent / root).resolve()

    def set_photo_root(self, root: str | os.PathLike) -> None:
        """Photos moved with their folder: paths are now relative to `root` (they are not rewritten)."""
        self._set_meta("photo_root", str(Path(root).resolve()))

    def stored_path(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            return path.relative_to(self.photo_root).as_posix()
        except ValueError:
            return str(path)

    def resolve(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.photo_root / path

    # Individuals

    def individual(self, name: str) -> str | None:
        """The individual `name` is (an id, or an alias of one), or None."""
        with self.lock:
            return _individual_of(self.db, name)

    def _ensure_individual(self, db: sqlite3.Connection, name: str) -> tuple[str, bool]:
        """(the individual `name` is, whether it was created); a new id must follow the id rule."""
        found = _individual_of(db, name)
        if found is not None:
            return found, False
        if not is_valid_id(name):
            raise WhalefastError(f"{name!r}: not a valid id (an id is {ID_RULE})")
        db.execute("INSERT INTO individuals (id, created) VALUES (?, ?)", (name, now()))
        return name, True

    # Photos

    def add_photos(
        self, records: list[PhotoRecord], relabel: bool = False, what: str = "photos", model: str | None = None, vectors=None, keep: bool = False
    ) -> Added:
        """Catalogue `records` in one transaction: new photos are added (and every record's `vectors` stored for `model`), photos already
        there under the same individual are left alone, under another one refused unless `relabel` (which moves them, recorded in the
        history) or `keep` (which leaves them as the catalogue has them, and lists them)."""
        with self.transaction() as db:
            result = self._add(db, records, relabel, what, keep)
            if model is not None and vectors is not None:
                ids = {r.digest: row for r, row in zip(records, self._ids_of(db, [r.digest for r in records]))}
                self._put(db, model, [ids[r.digest] for r in records], vectors)
        return result

    def _ids_of(self, db, digests: list[str]) -> list[int]:
        found = {}
        for chunk, marks in _in_chunks(digests):
            found.update(db.execute(f"SELECT digest, id FROM photos WHERE digest IN ({marks})", chunk).fetchall())
        return [found[d] for d in digests]

    def _add(self, db: sqlite3.Connection, records: list[PhotoRecord], relabel: bool, what: str, keep: bool = False) -> Added:
        result, seen = Added(), {}
        existing = {}
        for chunk, marks in _in_chunks([r.digest for r in records]):
            existing.update({row["digest"]: row for row in db.execute(f"SELECT * FROM photos WHERE digest IN ({marks})", chunk)})
        conflicts = []
        for r in records:
            if r.digest in seen:
                if seen[r.digest] != r.individual:
                    raise Conflict(f"{what}: {r.path.name} is the same photo as another one listed, with another id ({seen[r.digest]} vs {r.individual})")
                continue
            seen[r.digest] = r.individual
            individual = None
            if r.individual is not None:
                individual, created = self._ensure_individual(db, r.individual)
                if created:
                    result.new_ids.append(individual)
            old = existing.get(r.digest)
            if old is None:
                cursor = db.execute(
                    f"INSERT INTO photos (digest, path, individual, source, added, {', '.join(METADATA)}) VALUES (?, ?, ?, ?, ?, {', '.join('?' * len(METADATA))})",
                    (r.digest, self.stored_path(r.path), individual, r.source, now(), *[_metadata(r.metadata, k) for k in METADATA]),
                )
                result.added.append(cursor.lastrowid)
                existing[r.digest] = {"id": cursor.lastrowid, "individual": individual}
            elif individual is None or old["individual"] == individual:
                result.unchanged.append(old["id"])
            elif old["individual"] is None or relabel:
                db.execute("UPDATE photos SET individual = ? WHERE id = ?", (individual, old["id"]))
                _labels_changed(db)
                if old["individual"] is not None:
                    result.relabelled.append((str(r.path), old["individual"], individual))
                    _record(db, "relabel", individual, {"photo": old["id"], "from": old["individual"], "to": individual, "source": what})
            elif keep:
                result.kept.append((str(r.path), old["individual"], individual))
            else:
                conflicts.append((r, old["individual"], individual))
        if conflicts:
            r, old, new = conflicts[0]
            raise Conflict(
                f"{what}: {r.path.name} is already catalogued as {old}, not {new} ({len(conflicts)} such photos); pass --relabel to move them to the new ids"
            )
        if result.added or result.relabelled:
            _record(db, "add", what, {"photos": len(result.added), "relabelled": len(result.relabelled), "new_ids": result.new_ids})
        return result

    # Embeddings

    def put_embeddings(self, model: str, photo_ids, vectors) -> None:
        """Store `vectors` (one row per photo id) for `model` as unit float16 rows, replacing any there were."""
        with self.transaction() as db:
            self._put(db, model, photo_ids, vectors)

    @staticmethod
    def _put(db, model: str, photo_ids, vectors) -> None:
        vectors, photo_ids = np.asarray(vectors, dtype=np.float32), [int(p) for p in photo_ids]
        vectors = (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).astype(np.float16)  # search relies on unit rows
        for chunk, marks in _in_chunks(photo_ids):
            if db.execute(f"SELECT 1 FROM embeddings WHERE model = ? AND photo IN ({marks}) LIMIT 1", (model, *chunk)).fetchone():
                _labels_changed(db)  # an embedding is replaced: readers must reload, not append
                break
        db.executemany(
            "INSERT OR REPLACE INTO embeddings (model, photo, vector) VALUES (?, ?, ?)", ((model, int(p), v.tobytes()) for p, v in zip(photo_ids, vectors))
        )

    def has_model(self, model: str) -> bool:
        return bool(self.query("SELECT 1 FROM embeddings WHERE model = ? LIMIT 1", (model,)))

    def unembedded(self, model: str) -> list[tuple[int, Path]]:
        """(photo id, file) of identified photos with no embedding for `model` yet (added by import, or for another model)."""
        rows = self.query(
            "SELECT id, path FROM photos WHERE individual IS NOT NULL AND id NOT IN (SELECT photo FROM embeddings WHERE model = ?) ORDER BY id", (model,)
        )
        return [(r["id"], self.resolve(r["path"])) for r in rows]

    def rows(self, model: str, photo_filter: PhotoFilter | None = None, after: int = 0) -> Rows:
        """The identified photos with an embedding for `model` that `photo_filter` lets through (only embeddings stored after `after`, a
        Rows.last), in photo order (newer ones: in the order they were stored); read in chunks straight into one float16 array with room to grow, so a million photos take
        their own size and little more."""
        where, params = (photo_filter or PhotoFilter()).sql()
        if after:  # a few new embeddings: a range of rowids (the unary + keeps SQLite off the model index, which would scan them all), then their photos
            tables, model_term, order = "embeddings e CROSS JOIN photos p ON p.id = e.photo", "+e.model", "e.rowid"
        else:  # all of them in the (model, photo) key's order: no sort of a million rows
            tables, model_term, order = "photos p JOIN embeddings e ON e.photo = p.id", "e.model", "e.photo"
        sql = f"FROM {tables} WHERE {model_term} = ? AND p.individual IS NOT NULL AND e.rowid > ? AND {where}"
        params = (model, after, *params)
        root = str(self.photo_root)
        photo_ids, individuals, paths, last = [], [], [], after
        with self.lock:
            self.db.execute("BEGIN")  # one snapshot for the count and the rows
            try:
                count, dims = self.db.execute(f"SELECT count(*), max(length(e.vector)) / 2 {sql}", params).fetchone()
                buffer = np.zeros((room_for(count) if after == 0 else count, dims or 0), np.float16)
                cursor = self.db.cursor()
                cursor.row_factory = None  # plain tuples: a million rows are read in seconds
                path = "CASE WHEN substr(p.path, 1, 1) = '/' THEN p.path ELSE rtrim(?, '/') || '/' || p.path END"  # joined to the root in SQLite: a million paths in no time
                cursor.execute(f"SELECT p.id, p.individual, {path}, e.vector, e.rowid {sql} ORDER BY {order}", (root, *params))
                while chunk := cursor.fetchmany(10_000):
                    photos, names, stored, vectors, rowids = zip(*chunk)
                    buffer[len(photo_ids) : len(photo_ids) + len(chunk)] = np.frombuffer(b"".join(vectors), np.float16).reshape(len(chunk), -1)
                    photo_ids += photos
                    individuals += names
                    paths += stored
                    last = max(last, max(rowids))
            finally:
                self.db.execute("COMMIT")
        return Rows(np.array(photo_ids, dtype=np.int64), individuals, paths, buffer, last)

    @property
    def labels_revision(self) -> int:
        """A number that moves on whenever a catalogued photo changes individual (merge, unmerge, rename, relabel) or embedding: appending is not enough."""
        return int(self._meta("labels_revision") or 0)

    def filtered_ids(self, photo_filter: PhotoFilter) -> set[int]:
        where, params = photo_filter.sql()
        return {r[0] for r in self.query(f"SELECT id FROM photos WHERE {where}", params)}

    # Curation

    def merge(self, keep: str, merged: str) -> dict:
        """`merged`'s photos move to `keep`, and `merged` becomes an alias of it; recorded, and undone by `unmerge`."""
        with self.transaction() as db:
            a, b = self._existing(db, keep), self._existing(db, merged)
            if a == b:
                raise WhalefastError(f"{keep} and {merged} are already one individual")
            photos = [r[0] for r in db.execute("SELECT id FROM photos WHERE individual = ?", (b,))]
            row = db.execute("SELECT name, notes, created FROM individuals WHERE id = ?", (b,)).fetchone()
            aliases = [r[0] for r in db.execute("SELECT alias FROM aliases WHERE individual = ?", (b,))]
            db.execute("UPDATE photos SET individual = ? WHERE individual = ?", (a, b))
            _labels_changed(db)
            db.execute("UPDATE aliases SET individual = ? WHERE individual = ?", (a, b))
            db.execute("DELETE FROM individuals WHERE id = ?", (b,))
            db.execute("INSERT INTO aliases (alias, individual, source) VALUES (?, ?, 'merge')", (b, a))
            _record(db, "merge", b, {"into": a, "photos": photos, "aliases": aliases, "name": row["name"], "notes": row["notes"], "created": row["created"]})
        return {"kept": a, "merged": b, "photos": len(photos)}

    def unmerge(self, merged: str) -> dict:
        """Undo the last merge of `merged`: it is an individual again, with the photos it had (those not moved on since)."""
        with self.transaction() as db:
            alias = db.execute("SELECT individual FROM aliases WHERE alias = ? AND source = 'merge'", (merged,)).fetchone()
            entry = db.execute("SELECT details FROM history WHERE action = 'merge' AND subject = ? ORDER BY id DESC LIMIT 1", (merged,)).fetchone()
            if alias is None or entry is None:
                raise WhalefastError(f"{merged}: not an id that was merged into another (see `whalefast catalogue history`)")
            details, into = json.loads(entry[0]), alias[0]
            db.execute("DELETE FROM aliases WHERE alias = ?", (merged,))
            db.execute(
                "INSERT INTO individuals (id, name, notes, created) VALUES (?, ?, ?, ?)", (merged, details["name"], details["notes"], details["created"])
            )
            moved = [p for p in details["photos"] if db.execute("SELECT 1 FROM photos WHERE id = ? AND individual = ?", (p, into)).fetchone()]
            db.executemany("UPDATE photos SET individual = ? WHERE id = ?", [(merged, p) for p in moved])
            _labels_changed(db)
            for alias_name in details["aliases"]:
                db.execute("UPDATE aliases SET individual = ? WHERE alias = ? AND individual = ?", (merged, alias_name, into))
            _record(db, "unmerge", merged, {"from": into, "photos": moved})
        return {"restored": merged, "from": into, "photos": len(moved)}

    def rename(self, old: str, new: str) -> dict:
        """The individual `old` is called `new` from now on; `old` stays findable as an alias."""
        if not is_valid_id(new):
            raise WhalefastError(f"{new!r}: not a valid id (an id is {ID_RULE})")
        with self.transaction() as db:
            current = self._existing(db, old)
            if _individual_of(db, new) is not None:
                raise WhalefastError(f"{new} is already an individual or an alias; merge them instead (`whalefast catalogue merge {new} {old}`)")
            db.execute("UPDATE individuals SET id = ? WHERE id = ?", (new, current))  # photos and aliases follow (ON UPDATE CASCADE)
            _labels_changed(db)
            db.execute("INSERT INTO aliases (alias, individual, source) VALUES (?, ?, 'rename')", (current, new))
            _record(db, "rename", new, {"from": current, "to": new})
        return {"from": current, "to": new}

    def _existing(self, db, name: str) -> str:
        found = _individual_of(db, name)
        if found is None:
            raise WhalefastError(f"{name}: no such individual in {self.path}")
        return found

    def history(self, limit: int = 50) -> list[dict]:
        return [dict(r) | {"details": json.loads(r["details"])} for r in self.query("SELECT * FROM history ORDER BY id DESC LIMIT ?", (limit,))]

    def describe(self, name: str) -> dict:
        """An individual with its aliases and sightings (photos with date, place, photographer), oldest first."""
        found = self.individual(name)
        if found is None:
            raise WhalefastError(f"{name}: no such individual in {self.path}")
        row = self.query("SELECT * FROM individuals WHERE id = ?", (found,))[0]
        aliases = [r[0] for r in self.query("SELECT alias FROM aliases WHERE individual = ? ORDER BY alias", (found,))]
        photos = self.query(f"SELECT id, path, digest, source, added, {', '.join(METADATA)} FROM photos WHERE individual = ? ORDER BY event_date, id", (found,))
        return {
            "id": found,
            "name": row["name"],
            "notes": row["notes"],
            "aliases": aliases,
            "sightings": [dict(p) | {"path": str(self.resolve(p["path"]))} for p in photos],
        }

    def last_sightings(self, individuals: list[str]) -> dict[str, dict]:
        """Per individual, its latest dated sighting (date, locality), for the review app's candidates."""
        if not individuals:
            return {}
        rows = self.query(
            f"SELECT individual, event_date, locality FROM photos WHERE event_date != '' AND individual IN ({','.join('?' * len(individuals))}) "
            "ORDER BY event_date",
            individuals,
        )
        return {r["individual"]: {"date": r["event_date"], "locality": r["locality"]} for r in rows}

    def summary(self, model: str | None = None) -> dict:
        out = {
            "individuals": self.query("SELECT count(*) FROM individuals")[0][0],
            "photos": self.query("SELECT count(*) FROM photos WHERE individual IS NOT NULL")[0][0],
            "aliases": self.query("SELECT count(*) FROM aliases")[0][0],
        }
        if model is not None:
            row = self.query("SELECT count(*), max(length(vector)) FROM embeddings WHERE model = ?", (model,))[0]
            out |= {"photos with an embedding": row[0], "embedding_dim": (row[1] or 0) // 2}
        return out

    def export(self) -> pd.DataFrame:
        """Every identified photo with its id, name and sighting metadata (Image: its file)."""
        import pandas as pd

        rows = self.query(
            f"SELECT p.path, p.individual AS Id, i.name, p.digest, p.source, {', '.join('p.' + m for m in METADATA)} "
            "FROM photos p JOIN individuals i ON i.id = p.individual ORDER BY p.individual, p.event_date, p.id"
        )
        df = pd.DataFrame([dict(r) for r in rows], columns=["path", "Id", "name", "digest", "source", *METADATA])
        return df.assign(Image=[str(self.resolve(p)) for p in df.path]).drop(columns="path")

    # Review

    def queue(self, model: str) -> list[sqlite3.Row]:
        return self.query("SELECT qid, name, file, added FROM queries WHERE model = ? ORDER BY rowid", (model,))

    def add_query(self, model: str, qid: str, name: str, file: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO queries (model, qid, name, file, added) VALUES (?, ?, ?, ?, ?)", (model, qid, name, file, now()))

    def decisions(self, model: str, query: str | None = None) -> list[dict]:
        sql, params = "SELECT * FROM decisions WHERE model = ?", [model]
        if query is not None:
            sql, params = sql + " AND query = ?", params + [query]
        return [dict(r) for r in self.query(sql + " ORDER BY id", params)]

    def decide(self, model: str, row: dict, expected: int | None = None, photo: PhotoRecord | None = None, vector=None) -> dict:
        """Record one review decision and the catalogue change it implies in one transaction; a Conflict if another decision came first."""
        with self.transaction() as db:
            made = db.execute("SELECT decision, individual, time FROM decisions WHERE model = ? AND query = ? ORDER BY id", (model, row["query"])).fetchall()
            if made and made[-1]["decision"] in FINAL:
                last = made[-1]
                raise Conflict(f"{row['photo']} was already decided ({last['decision']} {last['individual']}, {last['time']}); reload the page")
            if expected is not None and expected != len(made):
                raise Conflict(f"{row['photo']} got another decision while you looked at it; reload the page to see it")
            row = dict(row, catalogue="")
            if photo is not None:
                added = self._add(db, [photo], relabel=False, what="review")
                if added.added and vector is not None:
                    self._put(db, model, added.added, np.asarray(vector)[None])
                row["catalogue"] = "added" if added.added else "already there"
            db.execute(f"INSERT INTO decisions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
        return row


def _storage_error(e: sqlite3.DatabaseError, path: Path) -> StorageError | None:
    """SQLite's words for a full disk or an unwritable file as whalefast's one line (None for other errors)."""
    text = str(e).lower()
    if "full" in text or "disk i/o" in text:
        return StorageError(os_error_text(OSError(FULL_DISK[0], str(e)), path))
    if "readonly" in text or "unable to open" in text:
        return StorageError(os_error_text(OSError(NOT_WRITABLE[0], str(e)), path))
    return None


def _metadata(metadata: dict, key: str):
    value = metadata.get(key)
    if key in ("latitude", "longitude"):
        return None if value in (None, "") else float(value)
    return "" if value is None else str(value)


def _individual_of(db: sqlite3.Connection, name: str) -> str | None:
    """The individual `name` is: its own id, or the id it is an alias of; None if neither."""
    row = db.execute("SELECT id FROM individuals WHERE id = ? UNION SELECT individual FROM aliases WHERE alias = ?", (name, name)).fetchone()
    return row[0] if row else None


def _in_chunks(values: list) -> Iterator[tuple[list, str]]:
    """`values` in chunks that one SQL statement can take, each with its `?, ?, ...` placeholders for an IN (...) list."""
    for start in range(0, len(values), IN_CHUNK):
        chunk = values[start : start + IN_CHUNK]
        yield chunk, ",".join("?" * len(chunk))


def _labels_changed(db: sqlite3.Connection) -> None:
    db.execute("INSERT INTO meta (key, value) VALUES ('labels_revision', '1') ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1")


def _record(db: sqlite3.Connection, action: str, subject: str, details: dict) -> None:
    db.execute("INSERT INTO history (time, action, subject, details) VALUES (?, ?, ?, ?)", (now(), action, subject, json.dumps(details)))
