"""The match-review web app (`whalefast serve`): FastAPI pages over whalefast.review.logic, guarded by whalefast.review.guard, served by uvicorn."""

from __future__ import annotations

import io
import os
from pathlib import Path
from urllib.parse import quote, unquote, urlencode

from fastapi import FastAPI, Form, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from PIL import Image

from whalefast.core.console import console
from whalefast.core.errors import StorageError, WhalefastError
from whalefast.db.filters import PhotoFilter, parse_filter
from whalefast.review.guard import RequestGuard, allowed_hosts, check_token, review_secret
from whalefast.review.logic import DECISIONS, FINAL, Review, ReviewError, too_large

PACKAGE = Path(__file__).parent
MAX_FILES_PER_UPLOAD = 500
CROP_HEIGHT = 224  # pixels: fluke crops side by side are shown at one height
FILTER_FIELDS = ("where", "since", "until", "near", "within_km")
REVIEWER_COOKIE = "whalefast_reviewer"  # the name a reviewer gave with their last decision


def create_app(
    run_dir: str | os.PathLike,
    max_upload_bytes: int | None = None,
    host: str = "127.0.0.1",
    allow_hosts: list[str] | tuple[str, ...] = (),
    db: str | os.PathLike | None = None,
    runtime: str = "auto",
):
    """The FastAPI app reviewing matches of the trained run in `run_dir` (against the catalogue database `db`), answering at `host` (and `allow_hosts`)."""
    review = Review(run_dir, db=db, runtime=runtime, **({"max_upload_bytes": max_upload_bytes} if max_upload_bytes else {}))
    templates = Jinja2Templates(directory=str(PACKAGE / "templates"))
    app = FastAPI(title="whalefast review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.review = review
    app.mount("/static", StaticFiles(directory=str(PACKAGE / "static")), name="static")
    extra = {h.lower().strip("[]") for h in allow_hosts}
    app.add_middleware(RequestGuard, hosts=allowed_hosts(host, allow_hosts), extra_hosts=extra, secret=review_secret(review.folder))

    def page(request: Request, name: str, http_status: int = 200, errors=(), notices=(), **context) -> HTMLResponse:
        done, total = review.progress()
        common = {
            "model": review.run_dir.name,
            "method": review.method.name,
            "n_ids": len(review.known_ids()),
            "done": done,
            "total": total,
            "errors": list(errors),
            "notices": decided_notice(request) + list(notices),
            "csrf": request.scope.get("state", {}).get("csrf_token", ""),
        }
        return templates.TemplateResponse(request, name, {**common, **context}, status_code=http_status)

    def decided_notice(request: Request) -> list[str]:
        """After a decision redirects to the next photo, the page confirms what was recorded (?decided=QUERY)."""
        qid = request.query_params.get("decided")
        made = review.decisions_of(qid) if qid in review.queue else []
        if not made:
            return []
        row = made[-1]
        note = f"{row['photo']}: {DECISIONS[row['decision']]} {row['id']}".strip()
        return [note + (f" (added to the catalogue of {review.run_dir.name})" if row["catalogue"] == "added" else "")]

    def index(request: Request, status: int = 200, errors=(), notices=()) -> HTMLResponse:
        rows = []
        for q in list(review.queue.values()):
            state = review.status(q.qid)
            best = review.candidates(q.qid, 1)
            rows.append(
                {
                    "qid": q.qid,
                    "name": q.name,
                    "status": state,
                    "status_text": review.status_text(q.qid),
                    "best": f"{best[0].id} ({best[0].score:.3f})" if best else "",
                    "added": q.added,
                }
            )
        return page(request, "index.html", status, errors, notices, queue=rows, next_pending=review.next_pending())

    def query_page(request: Request, qid: str, n: int = 5, status: int = 200, errors=(), notices=()) -> HTMLResponse:
        query = review.get(qid)
        state = review.status(qid)
        made = review.decisions_of(qid)
        shown = {k: request.query_params.get(k, "") for k in FILTER_FIELDS}
        try:
            photo_filter = parse_filter(
                [shown["where"]] if shown["where"] else [],
                shown["since"],
                shown["until"],
                shown["near"],
                float(shown["within_km"]) if shown["within_km"] else None,
            )
        except (WhalefastError, ValueError) as e:
            photo_filter, errors = PhotoFilter(), [*errors, f"filter ignored: {e}"]
        return page(
            request,
            "query.html",
            status,
            errors,
            notices,
            query=query,
            n=n,
            filters=shown,
            filtered=photo_filter.describe() if photo_filter.active else "",
            candidates=review.candidates(qid, n, photo_filter),
            catalogue=review.method.has_catalogue,
            decisions=made,
            status=state,
            status_text=review.status_text(qid),
            final=state in FINAL,
            threshold=review.threshold,
            next_pending=review.next_pending(after=qid),
            reviewer=unquote(request.cookies.get(REVIEWER_COOKIE, "")),
        )

    @app.exception_handler(ReviewError)
    def review_error(request: Request, exc: ReviewError):
        return index(request, exc.status, errors=[str(exc)])

    @app.exception_handler(StorageError)
    def storage_error(request: Request, exc: StorageError):
        return index(request, 507, errors=[f"nothing was changed: {exc}"])

    @app.exception_handler(WhalefastError)
    def whalefast_error(request: Request, exc: WhalefastError):
        return index(request, 500, errors=[str(exc)])

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request):
        return index(request)

    @app.post("/upload", response_class=HTMLResponse)
    def upload(request: Request, files: list[UploadFile] | None = None, csrf: str = Form("")):
        check_token(request, csrf)
        files = [f for f in (files or []) if f.filename]
        if not files:
            return index(request, 400, errors=["no photos chosen"])
        if len(files) > MAX_FILES_PER_UPLOAD:
            return index(request, 413, errors=[f"{len(files)} files in one upload; at most {MAX_FILES_PER_UPLOAD}"])
        errors, added = [], []
        for f in files:
            try:
                if f.size is not None and f.size > review.max_upload_bytes:
                    raise too_large(f.filename, f.size, review.max_upload_bytes)
                data = f.file.read(review.max_upload_bytes + 1)  # never more than the limit in memory
                added.append(review.add(f.filename, data).name)
            except (ReviewError, StorageError) as e:
                errors.append(str(e))
        notices = [f"added {len(added)} photo{'s' if len(added) != 1 else ''} to the queue"] if added else []
        return index(request, 200 if added else 400, errors=errors, notices=notices)

    @app.get("/query/{qid}", response_class=HTMLResponse)
    def show_query(request: Request, qid: str, n: int = 5, merged: str = "", into: str = ""):
        notices = [f"merged {merged} into {into}: its photos are {into}'s now (undo with `whalefast catalogue unmerge {merged}`)"] if merged and into else []
        return query_page(request, qid, max(1, min(n, 50)), notices=notices)

    @app.post("/query/{qid}/merge", response_class=HTMLResponse)
    def merge(request: Request, qid: str, keep: str = Form(""), merged: str = Form(""), n: int = Form(5), csrf: str = Form("")):
        check_token(request, csrf)
        review.get(qid)
        if not keep or not merged or keep == merged:
            return query_page(request, qid, n, 400, errors=["choose two different candidates to merge"])
        try:
            review.merge(keep, merged)
        except ReviewError as e:
            return query_page(request, qid, n, e.status, errors=[str(e)])
        return RedirectResponse(f"/query/{qid}?{urlencode({'n': n, 'merged': merged, 'into': keep})}", status_code=303)

    @app.post("/query/{qid}/decide", response_class=HTMLResponse)
    def decide(
        request: Request,
        qid: str,
        decision: str = Form(""),
        same_id: str = Form(""),
        new_id: str = Form(""),
        comment: str = Form(""),
        reviewer: str = Form(""),
        expected: int | None = Form(None),
        n: int = Form(5),
        csrf: str = Form(""),
    ):
        check_token(request, csrf)
        reviewer = reviewer.strip()
        if same_id and not decision:
            decision = "same"
        whale_id = same_id if decision == "same" else new_id
        try:
            review.decide(qid, decision, whale_id, comment, expected, reviewer)
        except ReviewError as e:
            review.get(qid)  # an unknown query is a 404 on the queue page
            return query_page(request, qid, n, e.status, errors=[str(e)])
        following = review.next_pending(after=qid)
        target = f"/query/{following}?n={n}&decided={qid}" if following else f"/?decided={qid}"
        answer = RedirectResponse(target, status_code=303)
        answer.set_cookie(REVIEWER_COOKIE, quote(reviewer), max_age=365 * 24 * 3600, httponly=True, samesite="strict")  # the name the next form starts with
        return answer

    def photo(path: Path, view: str) -> Response:
        """The photo itself, or with view=crop the fluke crop the model saw (its input size, grey where it is), at a fixed height so two line up."""
        if view != "crop":
            return FileResponse(path)
        array, problem = review.matcher.loader.load(path)
        if problem:
            return Response(f"photo cannot be shown: {problem}", status_code=415, media_type="text/plain")
        image = Image.fromarray(array)
        image = image.resize((round(image.width * CROP_HEIGHT / image.height), CROP_HEIGHT), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    @app.get("/photo/query/{qid}")
    def query_photo(qid: str, view: str = ""):
        return photo(review.get(qid).file, view)

    @app.get("/photo/known/{index}")
    def known_photo(index: int, view: str = ""):
        if not 0 <= index < len(review.known_photos) or not review.known_photos[index].is_file():
            return Response("photo not found", status_code=404, media_type="text/plain")
        return photo(review.known_photos[index], view)

    @app.get("/export.csv")
    def export():
        return Response(review.export(), media_type="text/csv", headers={"Content-Disposition": 'attachment; filename="review_log.csv"'})

    return app


def serve(
    run_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    allow_hosts: list[str] | tuple[str, ...] = (),
    db: str | os.PathLike | None = None,
    runtime: str = "auto",
) -> None:
    """Start the review app on host:port (127.0.0.1: this machine only) until interrupted."""
    import uvicorn

    if not 0 < port < 65536:
        raise WhalefastError(f"--port must lie in 1..65535, got {port}")
    app = create_app(run_dir, host=host, allow_hosts=allow_hosts, db=db, runtime=runtime)
    console.print(f"whalefast review of {Path(run_dir).name} at http://{host}:{port}/ (Ctrl-C stops it)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
