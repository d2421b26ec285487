"""The review app's guard: any page open in the reviewer's browser can send requests to the app, so it is guarded as a web app.

Requests whose Host header is not the app's own are refused (DNS rebinding), state-changing requests
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

from fastapi import Request
from fastapi.responses import PlainTextResponse
from starlette.datastructures import Headers, MutableHeaders

from whalefast.review.logic import ReviewError

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
