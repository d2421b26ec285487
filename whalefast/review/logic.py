"""Match review: a queue of query photos, their ranked candidates and the reviewers' decisions (the logic of `whalefast serve`).

Uploaded photos live beside the model (models/NAME/review/photos/); the queue and every decision
live in the catalogue database. A decision and the catalogue change it implies (a confirmed photo
joining an arcface run's catalogue) are one transaction, so a crash never leaves them disagreeing,
and two reviewers, or two `serve` processes on one database, lose nothing: a conflicting decision
is refused with a message.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from whalefast import NEW_WHALE
from whalefast.core.console import console
from whalefast.core.errors import WhalefastError
from whalefast.core.files import file_digest, read_safe_csv, remove_stale_temps, safe_csv_text, write_bytes
from whalefast.core.labels import ID_RULE, is_valid_id
from whalefast.db.filters import PhotoFilter
from whalefast.db.store import FINAL, CatalogueStore, Conflict, PhotoRecord
from whalefast.match.matcher import Matcher

DECISIONS = {"same": "same whale", "new": "new whale", "unsure": "not sure"}
LOG_COLUMNS = ["time", "reviewer", "query", "photo", "decision", "id", "rank", "score", "top_id", "top_score", "comment", "catalogue"]
LOG_TEXT = ["reviewer", "photo", "id", "top_id", "comment"]  # what people typed or named: never a formula in a spreadsheet
QUEUE_COLUMNS = ["query", "name", "file", "added"]
REVIEW_DIR = "review"  # beside the model, in its run folder: the uploaded photos
LEGACY_QUEUE, LEGACY_LOG = "review/queue.csv", "review_log.csv"  # where reviews kept these before the catalogue database
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
MAX_PIXELS = 64_000_000  # the largest fluke cameras give 61 MP; a 779 KB PNG can claim 178 MP and take seconds and gigabytes to decode
MAX_COMMENT = 2000
MAX_REVIEWER = 100
ALLOWED_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "BMP": ".bmp", "WEBP": ".webp"}


class ReviewError(WhalefastError):
    """A request the review cannot carry out, with the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Query:
    """An uploaded photo waiting for (or given) a decision."""

    qid: str
    name: str
    file: Path
    added: str


@dataclass(frozen=True)
class Candidate:
    """One proposed whale for a query: its rank, id, score, known photos (best match first) and its last dated sighting."""

    rank: int
    id: str
    score: float
    photos: list[int]  # indices into Review.known_photos
    last_seen: str = ""  # "2019-07-14, Husavik"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _log_row(decision: dict) -> dict:
    """A decision from the database under the review log's column names."""
    return {c: decision.get("individual" if c == "id" else c, "") for c in LOG_COLUMNS}


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def too_large(name: str, size: int, max_bytes: int = MAX_UPLOAD_BYTES) -> ReviewError:
    return ReviewError(f"{name}: too large ({_megabytes(size)}; the limit is {_megabytes(max_bytes)})", 413)


def check_upload(name: str, data: bytes, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS) -> str:
    """The file suffix to store an uploaded photo under, or a ReviewError saying why it is refused.

    Only the header is read to size the photo up, so a photo over `max_pixels` is refused before it is decoded.
    """
    if len(data) > max_bytes:
        raise too_large(name, len(data), max_bytes)
    if not data:
        raise ReviewError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                fmt, (width, height) = im.format, im.size
                im.verify()
    except Exception:  # noqa: BLE001 - PIL raises many types for non-images
        raise ReviewError(f"{name}: not a photo whalefast can read (JPEG, PNG, TIFF, BMP or WebP)", 415) from None
    if fmt not in ALLOWED_FORMATS:
        raise ReviewError(f"{name}: {fmt} images are not accepted (JPEG, PNG, TIFF, BMP or WebP)", 415)
    if width * height > max_pixels:
        raise ReviewError(f"{name}: {width}x{height} is {width * height / 1e6:.0f} megapixels; the limit is {max_pixels / 1e6:.0f}", 413)
    return ALLOWED_FORMATS[fmt]


class Review:
    """The review state of one trained run; safe to call from several threads (the database serialises changes).

    Photos are decoded and embedded outside any lock, so a large upload never holds up another reviewer's page.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        max_pixels: int = MAX_PIXELS,
        db: str | os.PathLike | None = None,
        runtime: str = "auto",
    ):
        self.matcher = Matcher(run_dir, db=db, runtime=runtime)
        self.run = self.matcher.run
        self.run_dir = self.run.path
        self.method = self.matcher.method
        self.store = self.matcher.store or CatalogueStore(db or self.run.catalogue_db)
        self.model = self.run.model_key
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self.folder = self.run / REVIEW_DIR
        self.photos_dir = self.folder / "photos"
        self.lock = threading.RLock()
        self._outputs: dict[str, torch.Tensor] = {}  # the network's output per query: computed once
        self._scored: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # scores against the catalogue as last read
        for folder in (self.run_dir, self.folder, self.photos_dir):
            remove_stale_temps(folder)
        self._migrate_legacy()
        self._load_known_photos()

    def _migrate_legacy(self) -> None:
        """A review from before the catalogue database: its queue.csv and review_log.csv go into the database once (the files are left)."""
        queue, log = self.run / LEGACY_QUEUE, self.run / LEGACY_LOG
        if not (queue.is_file() or log.is_file()) or self.store.queue(self.model) or self.store.decisions(self.model):
            return
        rows = read_safe_csv(queue, ["name"]).to_dict("records") if queue.is_file() else []
        decisions = read_safe_csv(log, LOG_TEXT).to_dict("records") if log.is_file() else []
        with self.store.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO queries (model, qid, name, file, added) VALUES (?, ?, ?, ?, ?)",
                [(self.model, r["query"], r["name"], r["file"], r["added"]) for r in rows],
            )
            columns = [c for c in LOG_COLUMNS if c != "id"]
            db.executemany(
                f"INSERT INTO decisions (model, individual, {', '.join(columns)}) VALUES (?, ?, {', '.join('?' * len(columns))})",
                [(self.model, d.get("id", ""), *[str(d.get(c, "")) for c in columns]) for d in decisions],
            )
        console.print(
            f"review: moved {len(rows)} queued photos and {len(decisions)} decisions of {self.run.name} into {self.store.path}; the CSV files are left as they were"
        )

    def _load_known_photos(self) -> None:
        """The photos shown beside candidates: catalogue entries (arcface) or training photos (softmax)."""
        self.known_photos: list[Path] = []
        self.photos_of: dict[str, list[int]] = {}
        self._add_known_photos(self.matcher.known_photos())

    def _add_known_photos(self, known: list[tuple[Path, str]]) -> None:
        for index, (photo, wid) in enumerate(known, start=len(self.known_photos)):
            self.known_photos.append(photo)
            self.photos_of.setdefault(wid, []).append(index)

    def _refresh(self) -> None:
        """Catch up with changes another reviewer or process made to the catalogue (photos only added: only those are read)."""
        with self.lock:
            before = self.matcher.catalogue
            if self.matcher.refresh():
                self._scored.clear()
                if before is not None and self.matcher.catalogue is before:
                    self._add_known_photos(before.known_photos(start=len(self.known_photos)))
                else:
                    self._load_known_photos()

    # The queue

    @property
    def queue(self) -> dict[str, Query]:
        """The queued photos, oldest first (every process sees the same queue)."""
        return {
            r["qid"]: Query(r["qid"], r["name"], self.photos_dir / r["file"], r["added"])
            for r in self.store.queue(self.model)
            if (self.photos_dir / r["file"]).is_file()
        }

    def add(self, name: str, data: bytes) -> Query:
        """Store an uploaded photo and queue it; the same photo uploaded again is the same query."""
        suffix = check_upload(name, data, self.max_upload_bytes, self.max_pixels)
        qid = hashlib.sha256(data).hexdigest()[:16]
        known = self.queue.get(qid)
        if known is not None:
            return known
        path = self.photos_dir / f"{qid}{suffix}"  # named by content: two uploads of one photo write the same bytes
        write_bytes(data, path)
        array, problem = self.matcher.loader.load(path)
        if problem:
            raise ReviewError(f"{name}: {problem}", 415)
        self._outputs.setdefault(qid, self.matcher.outputs([array])[0])
        self.store.add_query(self.model, qid, Path(name).name or qid, path.name)
        return self.queue[qid]

    def get(self, qid: str) -> Query:
        query = self.queue.get(qid)
        if query is None:
            raise ReviewError(f"no query photo {qid!r} in this review", 404)
        return query

    def decisions_of(self, qid: str) -> list[dict]:
        """The decisions recorded for a query, oldest first, under the review log's column names."""
        return [_log_row(d) for d in self.store.decisions(self.model, qid)]

    def status(self, qid: str) -> str:
        """'pending', or the latest decision."""
        made = self.decisions_of(qid)
        return made[-1]["decision"] if made else "pending"

    def status_text(self, qid: str) -> str:
        """'pending', or the latest decision in words with its id ("same whale w_1287fbc")."""
        made = self.decisions_of(qid)
        return f"{DECISIONS[made[-1]['decision']]} {made[-1]['id']}".strip() if made else "pending"

    def progress(self) -> tuple[int, int]:
        """(queries with a decision, queries)."""
        queue = self.queue
        decided = {d["query"] for d in self.store.decisions(self.model)}
        return len(decided & set(queue)), len(queue)

    def next_pending(self, after: str | None = None) -> str | None:
        """The first query without a decision, preferring those after `after` in the queue."""
        order = list(self.queue)
        decided = {d["query"] for d in self.store.decisions(self.model)}
        if after in order:
            i = order.index(after)
            order = order[i + 1 :] + order[: i + 1]
        return next((q for q in order if q not in decided), None)

    # Ranking

    def _output(self, qid: str) -> torch.Tensor:
        """The network's output for a query (computed once; outside any lock, as it decodes and embeds)."""
        if qid not in self._outputs:
            query = self.get(qid)
            array, problem = self.matcher.loader.load(query.file)
            if problem:
                raise ReviewError(f"{query.name}: {problem}", 415)
            self._outputs.setdefault(qid, self.matcher.outputs([array])[0])
        return self._outputs[qid]

    def _score(self, qid: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores per id, similarity per known photo or None) of a query against the current catalogue."""
        if qid not in self._scored:
            self._scored[qid] = self.matcher.scores_and_similarities(self._output(qid))
        return self._scored[qid]

    def candidates(self, qid: str, n: int = 5, photo_filter: PhotoFilter | None = None) -> list[Candidate]:
        """The `n` most likely whales for a query, one per id, each with its known photos (most similar first).

        With `photo_filter`, only catalogue photos it lets through count: an id with none never appears.
        """
        if n < 1:
            raise ReviewError(f"the number of candidates must be at least 1, got {n}")
        self._refresh()
        self._output(qid)
        with self.lock:
            scores, sims = self._score(qid)
            ids, photos_of = self.matcher.ids, self.photos_of
            if photo_filter is not None and photo_filter.active and sims is not None:
                allowed = np.isin(self.matcher.catalogue_ids(), list(self.store.filtered_ids(photo_filter)))
                photos_of = {i: [j for j in js if allowed[j]] for i, js in photos_of.items()}
                scores = torch.tensor([max((float(sims[j]) for j in photos_of.get(i, [])), default=-float("inf")) for i in ids])
            has_photos = torch.tensor([bool(photos_of.get(i)) for i in ids])
            scores = torch.where(has_photos, scores, torch.full_like(scores, -float("inf")))
            top = scores.topk(min(n, int(has_photos.sum()))).indices.tolist()
            seen = self.store.last_sightings([ids[i] for i in top])
            out = []
            for rank, i in enumerate(top, start=1):
                photos = photos_of.get(ids[i], [])
                if sims is not None:
                    photos = sorted(photos, key=lambda j: -float(sims[j]))
                last = seen.get(ids[i])
                out.append(Candidate(rank, ids[i], float(scores[i]), photos, ", ".join(v for v in (last["date"], last["locality"]) if v) if last else ""))
            return out

    @property
    def threshold(self) -> float | None:
        return self.matcher.threshold

    def known_ids(self) -> set[str]:
        self._refresh()
        return {i for i, photos in self.photos_of.items() if photos}

    # Decisions

    def decide(self, qid: str, decision: str, whale_id: str = "", comment: str = "", expected: int | None = None, reviewer: str = "") -> dict:
        """Record a decision on a query; for arcface runs a same/new decision adds the photo to the catalogue, in the same transaction.

        `expected` is how many decisions the reviewer saw on the page: if another reviewer decided
        meanwhile, the decision is refused (nothing is lost) and the page says what happened.
        """
        whale_id, comment, reviewer = whale_id.strip(), comment.strip(), reviewer.strip()
        if len(reviewer) > MAX_REVIEWER:
            raise ReviewError(f"the reviewer's name has {len(reviewer)} characters; at most {MAX_REVIEWER}")
        if decision not in DECISIONS:
            raise ReviewError(f"unknown decision {decision!r}; choose one of {', '.join(DECISIONS)}")
        if len(comment) > MAX_COMMENT:
            raise ReviewError(f"the comment has {len(comment)} characters; at most {MAX_COMMENT}")
        query = self.get(qid)
        output = self._output(qid)
        known = self.known_ids()
        if decision == "same" and whale_id not in known:
            raise ReviewError(f"{whale_id or 'no id'}: not a known whale; pick a candidate or choose 'new whale'")
        if decision == "new":
            if not is_valid_id(whale_id) or whale_id == NEW_WHALE:
                raise ReviewError(f"a new whale needs an id of {ID_RULE} (not new_whale)")
            if whale_id in known or self.store.individual(whale_id) is not None:
                raise ReviewError(f"{whale_id} is already a known whale; choose 'same whale' for it instead")
        if decision == "unsure":
            whale_id = ""
        rank, score, top_id, top_score = self._standing(qid, whale_id)
        row = {
            "time": _now(),
            "model": self.model,
            "reviewer": reviewer,
            "query": qid,
            "photo": query.name,
            "decision": decision,
            "individual": whale_id,
            "rank": rank,
            "score": score,
            "top_id": top_id,
            "top_score": top_score,
            "comment": comment,
        }
        photo = None
        if decision in FINAL and self.method.has_catalogue:
            photo = PhotoRecord(query.file, file_digest(query.file), whale_id, "review")
        try:
            saved = self.store.decide(self.model, row, expected, photo, output.numpy() if photo is not None else None)
        except Conflict as e:
            raise ReviewError(
                str(e).replace("pass --relabel to move them to the new ids", "relabel it with `whalefast catalogue add --relabel`"), 409
            ) from None
        self._refresh()
        return _log_row(saved)

    def _standing(self, qid: str, whale_id: str) -> tuple[str, str, str, str]:
        """(rank, score) of `whale_id` among the candidates of a query (blank when it is none of them), and the best candidate's (id, score): what the log records."""
        self._refresh()
        self._output(qid)
        with self.lock:
            scores, _ = self._score(qid)
            ids = self.matcher.ids
            has_photos = torch.tensor([bool(self.photos_of.get(i)) for i in ids], dtype=torch.bool)
            if not len(ids) or not has_photos.any():
                return "", "", "", ""
            scores = torch.where(has_photos, scores, torch.full_like(scores, -float("inf")))
            best = int(scores.argmax())
            position = ids.index(whale_id) if whale_id in ids and has_photos[ids.index(whale_id)] else None
            if position is None:
                return "", "", ids[best], f"{float(scores[best]):.4f}"
            rank = 1 + int((scores > scores[position]).sum())
            return str(rank), f"{float(scores[position]):.4f}", ids[best], f"{float(scores[best]):.4f}"

    def merge(self, keep: str, merged: str) -> dict:
        """Two candidates found to be one whale: `merged`'s photos move to `keep` (undone with `whalefast catalogue unmerge`)."""
        try:
            result = self.store.merge(keep, merged)
        except WhalefastError as e:
            raise ReviewError(str(e), 409) from None
        self._refresh()
        return result

    def export(self) -> bytes:
        """The review log as CSV bytes, safe to open in a spreadsheet."""
        log = pd.DataFrame([_log_row(d) for d in self.store.decisions(self.model)], columns=LOG_COLUMNS)
        return safe_csv_text(log, LOG_TEXT).encode()
