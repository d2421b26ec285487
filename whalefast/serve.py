"""The match-review web app (`whalefast serve`): FastAPI pages over whalefast.review, served by uvicorn.

Any page open in the reviewer's browser can send requests to the app, so it is guarded as a web app:
requests whose Host header is not the app's own are refused (DNS rebinding), state-changing requests
need a same-origin Origin (or Referer) and a CSRF token bound to the browser's session cookie, and
every response forbids framing, content sniffing, inline script and cross-origin embedding.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Form, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.datastructures import Headers, MutableHeaders

from whalefast.errors import StorageError, WhalefastError
from whalefast.review import DECISIONS, FINAL, Review, ReviewError, too_large

PACKAGE = Path(__file__).parent
MAX_FILES_PER_UPLOAD = 500
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


def allowed_hosts(host: str, extra: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The host names a browser may use to reach an app bound to `host`: that address and localhost (this machine's names too
    when bound to every interface), plus `extra` (--allow-host, e.g. a reverse proxy's name)."""
    names = {host.lower().strip("[]"), *LOCAL_HOSTS}
    if host in ("0.0.0.0", "::", ""):
        hostname = socket.gethostname()
        names |= {hostname.lower(), socket.getfqdn().lower()}
        try:
            names |= set(socket.gethostbyname_ex(hostname)[2])
        except OSError:
            pass
    return names | {h.lower().strip("[]") for h in extra}


def host_name(netloc: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1'; '[::1]:8000' -> '::1'."""
    return (urlsplit(f"//{netloc}").hostname or "").lower()


class RequestGuard:
    """ASGI middleware: Host check, same-origin check on state-changing requests, session cookie, security headers.

    The CSRF token itself is checked by each form's endpoint (`check_token`), against the session set here.
    """

    def __init__(self, app, hosts: set[str], extra_hosts: set[str], secret: bytes):
        self.app, self.hosts, self.extra_hosts, self.secret = app, hosts, extra_hosts, secret

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if host_name(host) not in self.hosts:
            shown = ", ".join(sorted(self.hosts))
            refusal = PlainTextResponse(f"this app answers only to the host names {shown}, not {host!r}; whalefast serve --allow-host adds one", 421)
            return await refusal(scope, receive, send)
        if scope["method"] not in SAFE_METHODS and not self.same_origin(headers, host):
            return await PlainTextResponse("cross-site request refused: this form did not come from the review app's own pages", 403)(scope, receive, send)
        cookie = session_cookie_name(scope)
        session = _cookie(headers, cookie)
        new_session = not session
        if new_session:
            session = secrets.token_urlsafe(24)
        scope.setdefault("state", {})["csrf_token"] = csrf_token(self.secret, session)

        async def send_guarded(message):
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    out[name] = value
                if not scope["path"].startswith("/static/"):
                    out["cache-control"] = "no-store"
                if new_session:
                    out.append("set-cookie", f"{cookie}={session}; Path=/; HttpOnly; SameSite=Strict")
            await send(message)

        await self.app(scope, receive, send_guarded)

    def same_origin(self, headers: Headers, host: str) -> bool:
        """Whether a state-changing request comes from the app's own pages (its Origin, or failing that its Referer).

        Browsers send Origin with every cross-site POST; a request with neither header (curl, a script
        on this machine) still needs the CSRF token.
        """
        origin = headers.get("origin") or headers.get("referer")
        if origin is None:
            return True
        if origin == "null":
            return False
        netloc = urlsplit(origin).netloc.lower()
        return netloc == host.lower() or host_name(netloc) in self.extra_hosts


def session_cookie_name(scope) -> str:
    """One cookie per port: two review apps on one machine share the browser's cookies for 127.0.0.1."""
    server = scope.get("server") or ("", 0)
    return f"whalefast_review_{server[1] or 0}"


def _cookie(headers: Headers, name: str) -> str:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name and value:
            return value
    return ""


def csrf_token(secret: bytes, session: str) -> str:
    """The token a session's forms carry: an HMAC of its session id, so another site can neither read nor forge it."""
    return hmac.new(secret, session.encode(), hashlib.sha256).hexdigest()


def check_token(request: Request, token: str) -> None:
    """A 403 ReviewError unless `token` is the request's session's CSRF token."""
    if not hmac.compare_digest(token or "", request.scope.get("state", {}).get("csrf_token", "")):
        raise ReviewError("this form is out of date or came from another site (no valid CSRF token); reload the page and try again", 403)


def review_secret(folder: Path) -> bytes:
    """The key that signs CSRF tokens, kept (readable by its owner alone) beside the review, so open pages survive a restart."""
    path = folder / "csrf.key"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".csrf.key.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        os.replace(tmp, path)
    return path.read_bytes()


def create_app(run_dir: str | os.PathLike, max_upload_bytes: int | None = None, host: str = "127.0.0.1", allow_hosts: list[str] | tuple[str, ...] = ()):
    """The FastAPI app reviewing matches of the trained run in `run_dir`, answering at `host` (and `allow_hosts`)."""
    review = Review(run_dir, **({"max_upload_bytes": max_upload_bytes} if max_upload_bytes else {}))
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
            "method": review.cfg.method,
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
        return page(
            request,
            "query.html",
            status,
            errors,
            notices,
            query=query,
            n=n,
            candidates=review.candidates(qid, n),
            decisions=made,
            status=state,
            status_text=review.status_text(qid),
            final=state in FINAL,
            threshold=review.threshold,
            next_pending=review.next_pending(after=qid),
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
    def show_query(request: Request, qid: str, n: int = 5):
        return query_page(request, qid, max(1, min(n, 50)))

    @app.post("/query/{qid}/decide", response_class=HTMLResponse)
    def decide(
        request: Request,
        qid: str,
        decision: str = Form(""),
        same_id: str = Form(""),
        new_id: str = Form(""),
        comment: str = Form(""),
        expected: int | None = Form(None),
        n: int = Form(5),
        csrf: str = Form(""),
    ):
        check_token(request, csrf)
        if same_id and not decision:
            decision = "same"
        whale_id = same_id if decision == "same" else new_id
        try:
            review.decide(qid, decision, whale_id, comment, expected)
        except ReviewError as e:
            review.get(qid)  # an unknown query is a 404 on the queue page
            return query_page(request, qid, n, e.status, errors=[str(e)])
        following = review.next_pending(after=qid)
        target = f"/query/{following}?n={n}&decided={qid}" if following else f"/?decided={qid}"
        return RedirectResponse(target, status_code=303)

    @app.get("/photo/query/{qid}")
    def query_photo(qid: str):
        return FileResponse(review.get(qid).file)

    @app.get("/photo/known/{index}")
    def known_photo(index: int):
        if not 0 <= index < len(review.known_photos) or not review.known_photos[index].is_file():
            return Response("photo not found", status_code=404, media_type="text/plain")
        return FileResponse(review.known_photos[index])

    @app.get("/export.csv")
    def export():
        return Response(review.export(), media_type="text/csv", headers={"Content-Disposition": 'attachment; filename="review_log.csv"'})

    return app


def serve(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, allow_hosts: list[str] | tuple[str, ...] = ()) -> None:
    """Start the review app on host:port (127.0.0.1: this machine only) until interrupted."""
    import uvicorn

    from whalefast.console import console

    if not 0 < port < 65536:
        raise WhalefastError(f"--port must lie in 1..65535, got {port}")
    app = create_app(run_dir, host=host, allow_hosts=allow_hosts)
    console.print(f"whalefast review of {Path(run_dir).name} at http://{host}:{port}/ (Ctrl-C stops it)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
