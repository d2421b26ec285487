"""Match review: a queue of query photos, their ranked candidates and the reviewers' decisions (the logic of `whalefast serve`).

Everything lives beside the model: uploaded photos in models/NAME/review/photos/, the queue in
review/queue.csv, every decision appended to review_log.csv. Each file is rewritten atomically, so a
crash or restart loses no earlier decision. For an arcface run, a confirmed photo joins the
catalogue through the same code path as `whalefast catalogue add`: the decision is logged first and
the catalogue follows it, so after a crash between the two the next start adds what the log says.
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

import pandas as pd
import torch
from PIL import Image

from whalefast import NEW_WHALE
from whalefast.core.console import console
from whalefast.core.errors import StorageError, WhalefastError
from whalefast.core.files import file_digest, read_safe_csv, remove_stale_temps, safe_csv_text, write_bytes, write_csv
from whalefast.core.labels import ID_RULE, is_valid_id
from whalefast.match.catalogue import add_photos
from whalefast.match.matcher import Matcher

DECISIONS = {"same": "same whale", "new": "new whale", "unsure": "not sure"}
FINAL = ("same", "new")  # decisions that put the photo in the catalogue; later ones are refused
LOG_COLUMNS = ["time", "query", "photo", "decision", "id", "rank", "score", "top_id", "top_score", "comment", "catalogue"]
LOG_TEXT = ["photo", "id", "top_id", "comment"]  # what people typed or named: never a formula in a spreadsheet
QUEUE_COLUMNS = ["query", "name", "file", "added"]
REVIEW_DIR, REVIEW_LOG = "review", "review_log.csv"  # beside the model, in its run folder
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
MAX_PIXELS = 64_000_000  # the largest fluke cameras give 61 MP; a 779 KB PNG can claim 178 MP and take seconds and gigabytes to decode
MAX_COMMENT = 2000
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
    """One proposed whale for a query: its rank, id, score and known photos (best match first)."""

    rank: int
    id: str
    score: float
    photos: list[int]  # indices into Review.known_photos


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


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
    """The review state of one trained run; safe to call from several threads (one lock guards every change).

    Photos are decoded and embedded outside the lock, so a large upload never holds up another reviewer's page.
    """

    def __init__(self, run_dir: str | os.PathLike, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS):
        self.matcher = Matcher(run_dir)
        self.run = self.matcher.run
        self.run_dir = self.run.path
        self.method = self.matcher.method
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self.folder = self.run / REVIEW_DIR
        self.photos_dir = self.folder / "photos"
        self.queue_path = self.folder / "queue.csv"
        self.log_path = self.run / REVIEW_LOG
        self.lock = threading.RLock()
        self._outputs: dict[str, torch.Tensor] = {}  # the network's output per query: computed once
        self._scored: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # scores against the current catalogue
        self.queue: dict[str, Query] = {}
        for folder in (self.run_dir, self.folder, self.photos_dir):
            remove_stale_temps(folder)
        if self.queue_path.is_file():
            for r in read_safe_csv(self.queue_path, ["name"]).itertuples(index=False):
                if (self.photos_dir / r.file).is_file():
                    self.queue[r.query] = Query(r.query, r.name, self.photos_dir / r.file, r.added)
        self.log = read_safe_csv(self.log_path, LOG_TEXT) if self.log_path.is_file() else pd.DataFrame(columns=LOG_COLUMNS)
        self._load_known_photos()
        if self.method.has_catalogue:
            self._catch_up_catalogue()

    def _load_known_photos(self) -> None:
        """The photos shown beside candidates: catalogue entries (arcface) or training photos (softmax)."""
        known = self.matcher.known_photos()
        self.known_photos = [photo for photo, _ in known]
        self.photos_of: dict[str, list[int]] = {}
        for index, (_, wid) in enumerate(known):
            self.photos_of.setdefault(wid, []).append(index)

    def _catch_up_catalogue(self) -> None:
        """Add to the catalogue the confirmed photos the log holds and the catalogue lacks (a crash between the two writes)."""
        catalogued = set(self.matcher.catalogue.digests)
        missing = []
        for row in self.log.itertuples(index=False):
            query = self.queue.get(row.query)
            if row.decision in FINAL and row.catalogue == "added" and query is not None and file_digest(query.file) not in catalogued:
                missing.append((query.file, row.id))
        if missing:
            self._grow_catalogue(missing)
            console.print(f"review: added {len(missing)} confirmed photos that the log holds and the catalogue did not (the app stopped between the two)")

    # The queue

    def add(self, name: str, data: bytes) -> Query:
        """Store an uploaded photo and queue it; the same photo uploaded again is the same query."""
        suffix = check_upload(name, data, self.max_upload_bytes, self.max_pixels)
        qid = hashlib.sha256(data).hexdigest()[:16]
        with self.lock:
            if qid in self.queue:
                return self.queue[qid]
        path = self.photos_dir / f"{qid}{suffix}"  # named by content: two uploads of one photo write the same bytes
        write_bytes(data, path)
        array, problem = self.matcher.loader.load(path)
        if problem:
            raise ReviewError(f"{name}: {problem}", 415)
        output = self.matcher.outputs([array])[0]
        with self.lock:
            if qid not in self.queue:
                self.queue[qid] = Query(qid, Path(name).name or qid, path, _now())
                self._save_queue()
            self._outputs.setdefault(qid, output)
            return self.queue[qid]

    def _save_queue(self) -> None:
        rows = [(q.qid, q.name, q.file.name, q.added) for q in self.queue.values()]
        write_csv(pd.DataFrame(rows, columns=QUEUE_COLUMNS), self.queue_path, user_text=["name"])

    def get(self, qid: str) -> Query:
        if qid not in self.queue:
            raise ReviewError(f"no query photo {qid!r} in this review", 404)
        return self.queue[qid]

    def decisions_of(self, qid: str) -> list[dict]:
        """The decisions recorded for a query, oldest first."""
        return self.log[self.log["query"] == qid].to_dict("records")

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
        with self.lock:
            decided = sum(self.status(q) != "pending" for q in self.queue)
            return decided, len(self.queue)

    def next_pending(self, after: str | None = None) -> str | None:
        """The first query without a decision, preferring those after `after` in the queue."""
        order = list(self.queue)
        if after in self.queue:
            i = order.index(after)
            order = order[i + 1 :] + order[: i + 1]
        return next((q for q in order if self.status(q) == "pending"), None)

    # Ranking

    def _output(self, qid: str) -> torch.Tensor:
        """The network's output for a query (computed once; outside the lock, as it decodes and embeds)."""
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

    def candidates(self, qid: str, n: int = 5) -> list[Candidate]:
        """The `n` most likely whales for a query, one per id, each with its known photos (most similar first)."""
        if n < 1:
            raise ReviewError(f"the number of candidates must be at least 1, got {n}")
        self._output(qid)
        with self.lock:
            scores, sims = self._score(qid)
            ids = self.matcher.ids
            has_photos = torch.tensor([bool(self.photos_of.get(i)) for i in ids])
            scores = torch.where(has_photos, scores, torch.full_like(scores, -float("inf")))
            top = scores.topk(min(n, int(has_photos.sum()))).indices.tolist()
            out = []
            for rank, i in enumerate(top, start=1):
                photos = self.photos_of.get(ids[i], [])
                if sims is not None:
                    photos = sorted(photos, key=lambda j: -float(sims[j]))
                out.append(Candidate(rank, ids[i], float(scores[i]), photos))
            return out

    @property
    def threshold(self) -> float | None:
        return self.matcher.threshold

    def known_ids(self) -> set[str]:
        return {i for i, photos in self.photos_of.items() if photos}

    # Decisions

    def decide(self, qid: str, decision: str, whale_id: str = "", comment: str = "", expected: int | None = None) -> dict:
        """Record a decision on a query; for arcface runs a same/new decision adds the photo to the catalogue.

        `expected` is how many decisions the reviewer saw on the page: if another reviewer decided
        meanwhile, the decision is refused (nothing is lost) and the page says what happened. The log
        is written before the catalogue: a crash between the two is caught up at the next start.
        """
        whale_id, comment = whale_id.strip(), comment.strip()
        if decision not in DECISIONS:
            raise ReviewError(f"unknown decision {decision!r}; choose one of {', '.join(DECISIONS)}")
        if len(comment) > MAX_COMMENT:
            raise ReviewError(f"the comment has {len(comment)} characters; at most {MAX_COMMENT}")
        self._output(qid)
        with self.lock:
            query = self.get(qid)
            made = self.decisions_of(qid)
            if made and made[-1]["decision"] in FINAL:
                last = made[-1]
                raise ReviewError(f"{query.name} was already decided ({DECISIONS[last['decision']]} {last['id']}, {last['time']}); reload the page", 409)
            if expected is not None and expected != len(made):
                raise ReviewError(f"{query.name} got another decision while you looked at it; reload the page to see it", 409)
            known = self.known_ids()
            if decision == "same" and whale_id not in known:
                raise ReviewError(f"{whale_id or 'no id'}: not a known whale; pick a candidate or choose 'new whale'")
            if decision == "new":
                if not is_valid_id(whale_id) or whale_id == NEW_WHALE:
                    raise ReviewError(f"a new whale needs an id of {ID_RULE} (not new_whale)")
                if whale_id in known:
                    raise ReviewError(f"{whale_id} is already a known whale; choose 'same whale' for it instead")
            if decision == "unsure":
                whale_id = ""
            ranked = self.candidates(qid, n=len(self.matcher.ids))
            rank = next((c.rank for c in ranked if c.id == whale_id), "")
            score = next((f"{c.score:.4f}" for c in ranked if c.id == whale_id), "")
            catalogue = self._plan_catalogue(query, whale_id) if decision in FINAL and self.method.has_catalogue else ""
            row = {
                "time": _now(),
                "query": qid,
                "photo": query.name,
                "decision": decision,
                "id": whale_id,
                "rank": str(rank),
                "score": score,
                "top_id": ranked[0].id if ranked else "",
                "top_score": f"{ranked[0].score:.4f}" if ranked else "",
                "comment": comment,
                "catalogue": catalogue,
            }
            before = self.log
            log = pd.concat([before, pd.DataFrame([row], columns=LOG_COLUMNS)], ignore_index=True)
            self._save_log(log)
            self.log = log
            if catalogue == "added":
                try:
                    self._grow_catalogue([(query.file, whale_id)], {str(query.file): self._outputs[qid]})
                except BaseException:
                    self._save_log(before)  # the decision did not happen: log and catalogue agree again
                    self.log = before
                    raise
            return row

    def _save_log(self, log: pd.DataFrame) -> None:
        write_csv(log, self.log_path, user_text=LOG_TEXT)

    def _plan_catalogue(self, query: Query, whale_id: str) -> str:
        """What confirming `query` as `whale_id` does to the catalogue ('added' or 'already there'); a 409 if it cannot."""
        try:
            plan = self.matcher.catalogue.plan([(query.file, whale_id)], "review")
        except WhalefastError as e:
            raise ReviewError(str(e), 409) from None
        if plan.relabel:
            _, _, old, _ = plan.relabel[0]
            raise ReviewError(f"{query.name} is already catalogued as {old}; confirm it as {old}, or relabel it with `whalefast catalogue add --relabel`", 409)
        return "added" if plan.new else "already there"

    def _grow_catalogue(self, photos: list[tuple[Path, str]], embedded: dict | None = None) -> None:
        try:
            add_photos(self.run, photos, source="review", embedded=embedded)
        except StorageError:
            raise
        except WhalefastError as e:  # e.g. the photo was catalogued under another id meanwhile: nothing changes
            raise ReviewError(str(e), 409) from None
        self.matcher.use_catalogue(self.run.catalogue())
        self._scored.clear()  # every score is against the grown catalogue now
        self._load_known_photos()

    def export(self) -> bytes:
        """The review log as CSV bytes, safe to open in a spreadsheet."""
        with self.lock:
            return safe_csv_text(self.log, LOG_TEXT).encode()
