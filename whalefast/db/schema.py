"""The catalogue database's schema: tables, their version, and the migrations from one version to the next."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 1

# Each entry takes a database at version i to version i + 1.
MIGRATIONS = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

    CREATE TABLE individuals (
        id TEXT PRIMARY KEY,                 -- the whale id: w_1287fbc, HW-MN0042
        name TEXT NOT NULL DEFAULT '',
        notes TEXT NOT NULL DEFAULT '',
        created TEXT NOT NULL
    );

    -- Other ids an individual is known by: ids merged into it, and names people use.
    CREATE TABLE aliases (
        alias TEXT PRIMARY KEY,
        individual TEXT NOT NULL REFERENCES individuals(id) ON UPDATE CASCADE,
        source TEXT NOT NULL                 -- 'merge', 'rename' or 'name'
    );

    CREATE TABLE photos (
        id INTEGER PRIMARY KEY,
        digest TEXT NOT NULL UNIQUE,         -- SHA-256 of the file's bytes: a photo's identity
        path TEXT NOT NULL,                  -- relative to the photo root (absolute when outside it)
        individual TEXT REFERENCES individuals(id) ON UPDATE CASCADE,
        occurrence_id TEXT NOT NULL DEFAULT '',
        event_date TEXT NOT NULL DEFAULT '', -- ISO 8601: 2019-07-14
        event_time TEXT NOT NULL DEFAULT '',
        locality TEXT NOT NULL DEFAULT '',
        latitude REAL,
        longitude REAL,
        photographer TEXT NOT NULL DEFAULT '',
        side TEXT NOT NULL DEFAULT '',
        quality TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL,                -- the file it was imported from, 'review' or a run's training data
        added TEXT NOT NULL
    );
    CREATE INDEX photos_individual ON photos(individual);
    CREATE INDEX photos_date ON photos(event_date);
    CREATE INDEX photos_locality ON photos(locality);

    -- One embedding per model and photo, as float16; a model is a run's name and the digest of its weights.
    CREATE TABLE embeddings (
        model TEXT NOT NULL,
        photo INTEGER NOT NULL REFERENCES photos(id) ON DELETE CASCADE,
        vector BLOB NOT NULL,
        PRIMARY KEY (model, photo)
    );

    -- The review app: its queue of query photos and every decision, each decision with the catalogue change it made in one transaction.
    CREATE TABLE queries (
        model TEXT NOT NULL,
        qid TEXT NOT NULL,
        name TEXT NOT NULL,
        file TEXT NOT NULL,
        added TEXT NOT NULL,
        PRIMARY KEY (model, qid)
    );
    CREATE TABLE decisions (
        id INTEGER PRIMARY KEY,
        time TEXT NOT NULL,
        model TEXT NOT NULL,
        reviewer TEXT NOT NULL DEFAULT '',
        query TEXT NOT NULL,
        photo TEXT NOT NULL,
        decision TEXT NOT NULL,
        individual TEXT NOT NULL DEFAULT '',
        rank TEXT NOT NULL DEFAULT '',
        score TEXT NOT NULL DEFAULT '',
        top_id TEXT NOT NULL DEFAULT '',
        top_score TEXT NOT NULL DEFAULT '',
        comment TEXT NOT NULL DEFAULT '',
        catalogue TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX decisions_query ON decisions(model, query);

    -- Append-only: every merge, unmerge, rename, relabel and import, with what is needed to undo it.
    CREATE TABLE history (
        id INTEGER PRIMARY KEY,
        time TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        details TEXT NOT NULL               -- JSON
    );
    """,
]


def version(db: sqlite3.Connection) -> int:
    """The schema version of `db` (0: empty)."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
        return 0
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def migrate(db: sqlite3.Connection) -> int:
    """Bring `db` to SCHEMA_VERSION, one migration per transaction; the version it was at."""
    start = version(db)
    if start > SCHEMA_VERSION:
        raise ValueError(f"schema version {start} is newer than this whalefast's ({SCHEMA_VERSION})")
    for target in range(start + 1, SCHEMA_VERSION + 1):
        try:
            db.executescript(
                f"BEGIN IMMEDIATE; {MIGRATIONS[target - 1]}; INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', '{target}'); COMMIT;"
            )
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    return start
