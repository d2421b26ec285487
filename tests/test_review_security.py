"""The review app as a web app any page in the reviewer's browser can reach: hosts, origins, CSRF, headers, exports, big photos, crashes."""

import io
import re
import subprocess
import sys
import threading

import pandas as pd
import pytest
from PIL import Image

from whalefast.core.errors import StorageError
from whalefast.review.logic import MAX_PIXELS, Review, ReviewError, check_upload
from whalefast.runs.folder import Run


def _photo(tiny_data, k=0) -> tuple[str, bytes]:
    name = pd.read_csv(tiny_data / "test_answers.csv").Image[k]
    return name, (tiny_data / "test" / name).read_bytes()


def _queued(client, tiny_data, k=0) -> str:
    name, data = _photo(tiny_data, k)
    assert client.post("/upload", files=[("files", (name, data, "image/jpeg"))]).status_code == 200
    return client.review.add(name, data).qid


def test_a_foreign_host_header_is_refused(arc_run, review_browser):
    client = review_browser(arc_run)
    for path in ("/", "/export.csv", "/photo/known/0"):
        refused = client.get(path, headers={"Host": "attacker.example"})  # what a DNS-rebinding page sends
        assert refused.status_code == 421 and "attacker.example" in refused.text
    assert client.get("/", headers={"Host": "localhost:8000"}).status_code == 200
    proxied = review_browser(arc_run, allow_hosts=["whales.lab.example"])
    assert proxied.get("/", headers={"Host": "whales.lab.example"}).status_code == 200
    assert proxied.get("/", headers={"Host": "evil.example"}).status_code == 421


def test_cross_site_requests_change_nothing(arc_run, tiny_data, review_browser, review_log):
    client = review_browser(arc_run)
    qid = _queued(client, tiny_data)
    photos = len(Run.open(arc_run).catalogue().photos)
    token = client.token(f"/query/{qid}")
    form = {"decision": "new", "new_id": "w_csrf", "csrf": token}
    for headers in ({"Origin": "http://evil.example"}, {"Referer": "http://evil.example/page"}, {"Origin": "null"}, {"Origin": "http://127.0.0.1:3000"}):
        answer = client.client.post(f"/query/{qid}/decide", data=form, headers=headers, follow_redirects=False)
        assert answer.status_code == 403, headers
    assert client.client.post(f"/query/{qid}/decide", data={**form, "csrf": ""}, follow_redirects=False).status_code == 403
    other = review_browser(arc_run)  # another browser: its own session, so its token is not this one's
    stolen = other.client.post(f"/query/{qid}/decide", data=form, headers={"Origin": other.ORIGIN}, follow_redirects=False)
    assert stolen.status_code == 403 and "CSRF" in stolen.text
    upload = client.client.post("/upload", files=[("files", ("x.jpg", _photo(tiny_data, 1)[1], "image/jpeg"))], headers={"Origin": "http://evil.example"})
    assert upload.status_code == 403
    assert len(review_log(arc_run)) == 0 and len(Run.open(arc_run).catalogue().photos) == photos and len(client.review.queue) == 1
    accepted = client.post(f"/query/{qid}/decide", data={"decision": "new", "new_id": "w_real"}, page=f"/query/{qid}", follow_redirects=False)
    assert accepted.status_code == 303 and len(review_log(arc_run)) == 1


def test_every_response_forbids_framing_sniffing_and_inline_script(arc_run, tiny_data, review_browser):
    client = review_browser(arc_run)
    qid = _queued(client, tiny_data)
    for path in ("/", f"/query/{qid}", f"/photo/query/{qid}", "/export.csv", "/static/review.js"):
        headers = client.get(path).headers
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff", path
        policy = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy and "unsafe-inline" not in policy, path
    for page in ("/", f"/query/{qid}"):
        html = client.get(page).text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), "an inline script would need 'unsafe-inline'"
        assert not re.search(r"\sstyle=|\son[a-z]+=", html), "inline styles and event handlers would need 'unsafe-inline'"
    cookie = review_browser(arc_run).get("/").headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_exported_and_logged_text_never_runs_as_a_formula(arc_run, tiny_data, review_browser, review_log):
    client = review_browser(arc_run)
    name, data = _photo(tiny_data)
    hostile_name = "=cmd|'calc'!A0.jpg"
    assert client.post("/upload", files=[("files", (hostile_name, data, "image/jpeg"))]).status_code == 200
    qid = client.review.add(hostile_name, data).qid
    for bad_id in ("=HYPERLINK(1)", "+1", "-1", "@SUM(A1)", "[/red]", "w 1"):
        refused = client.post(f"/query/{qid}/decide", data={"decision": "new", "new_id": bad_id}, page=f"/query/{qid}")
        assert refused.status_code == 400 and "needs an id of letters, digits" in refused.text, bad_id
    comment = '=HYPERLINK("http://evil.example","click")'
    reviewer = "=Ann <b>Lee</b>"
    client.post(f"/query/{qid}/decide", data={"decision": "unsure", "comment": comment, "reviewer": reviewer}, page=f"/query/{qid}")
    page = client.get(f"/query/{qid}").text
    assert 'value="=Ann &lt;b&gt;Lee&lt;/b&gt;"' in page and "<b>Lee" not in page  # the next form starts with the name, escaped
    client.post(f"/query/{qid}/decide", data={"decision": "new", "new_id": "w_ok", "comment": "-2+3+cmd|' /C calc'!A0"}, page=f"/query/{qid}")
    text = client.get("/export.csv").text
    cells = [cell for row in pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False).itertuples(index=False) for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], text
    assert f"'{comment}" in cells and f"'{hostile_name}" in cells and "'-2+3+cmd|' /C calc'!A0" in cells and f"'{reviewer}" in cells
    assert review_log(arc_run).comment.tolist() == [comment, "-2+3+cmd|' /C calc'!A0"]  # the database keeps what was typed
    restarted = Review(arc_run)  # what the app shows after a restart is what was typed
    assert [d["comment"] for d in restarted.decisions_of(qid)] == [comment, "-2+3+cmd|' /C calc'!A0"]
    assert restarted.queue[qid].name == hostile_name


def test_huge_photos_are_refused_before_decoding_and_decoding_holds_no_lock(arc_run, tiny_data):
    bomb = io.BytesIO()
    Image.new("1", (8200, 8000)).save(bomb, format="PNG")  # 66 megapixels in a few kilobytes
    assert len(bomb.getvalue()) < 200_000
    with pytest.raises(ReviewError, match="66 megapixels; the limit is 64") as e:
        check_upload("bomb.png", bomb.getvalue())
    assert e.value.status == 413 and MAX_PIXELS == 64_000_000

    review = Review(arc_run)
    first = review.add(*_photo(tiny_data, 0))
    entered, release = threading.Event(), threading.Event()
    load = review.matcher.loader.load

    def slow_load(path):
        entered.set()
        release.wait(20)
        return load(path)

    review.matcher.loader.load = slow_load
    uploading = threading.Thread(target=review.add, args=_photo(tiny_data, 1))
    uploading.start()
    assert entered.wait(20)
    answered = []
    reader = threading.Thread(target=lambda: answered.append((review.progress(), len(review.candidates(first.qid, 3)))))
    reader.start()
    reader.join(10)
    ready = bool(answered)
    release.set()
    uploading.join(20)
    assert ready and answered == [((0, 1), 3)], "a page waited for another reviewer's photo to decode"
    assert len(review.queue) == 2


KILLED_MID_DECISION = """
import os, sys
from whalefast.db.store import CatalogueStore
from whalefast.review.logic import Review

run, name, photo = sys.argv[1:4]
r = Review(run)
q = r.add(name, open(photo, "rb").read())
top = r.candidates(q.qid, 1)[0].id
CatalogueStore._put = lambda *a, **k: os._exit(9)  # killed inside the decision's transaction, the photo written, the decision not yet
r.decide(q.qid, "same", top, comment="killed")
"""


def test_a_decision_killed_half_way_leaves_neither_it_nor_its_catalogue_change(arc_run, tiny_data, review_log):
    name = pd.read_csv(tiny_data / "test_answers.csv").Image[0]
    before = len(Run.open(arc_run).catalogue().photos)
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_DECISION, str(arc_run), name, str(tiny_data / "test" / name)], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr

    review = Review(arc_run)
    (qid,) = review.queue
    assert review.status(qid) == "pending" and len(review_log(arc_run)) == 0
    assert len(Run.open(arc_run).catalogue().photos) == before  # the transaction never committed: no photo without its decision
    top = review.candidates(qid, 1)[0].id
    review.decide(qid, "same", top, comment="again")
    catalogue = Run.open(arc_run).catalogue()
    assert len(catalogue.photos) == before + 1 and catalogue.photos.count(str(review.queue[qid].file.resolve())) == 1
    assert review_log(arc_run)[["decision", "id", "comment", "catalogue"]].values.tolist() == [["same", top, "again", "added"]]


def test_a_failed_catalogue_write_takes_the_decision_back(arc_run, tiny_data, review_browser, monkeypatch, review_log):
    from whalefast.db.store import CatalogueStore

    client = review_browser(arc_run)
    qid = _queued(client, tiny_data)
    top = client.review.candidates(qid, 1)[0].id

    def full_disk(*args, **kwargs):
        raise StorageError(f"{arc_run.parent / 'catalogue.db'}: no space left on device; free some space and run it again")

    monkeypatch.setattr(CatalogueStore, "_put", full_disk)
    answer = client.post(f"/query/{qid}/decide", data={"same_id": top, "expected": "0"}, page=f"/query/{qid}")
    assert answer.status_code == 507 and "no space left on device" in answer.text and "nothing was changed" in answer.text
    assert len(review_log(arc_run)) == 0 and client.review.status(qid) == "pending"
    monkeypatch.undo()
    assert client.post(f"/query/{qid}/decide", data={"same_id": top, "expected": "0"}, page=f"/query/{qid}", follow_redirects=False).status_code == 303


def test_the_csrf_key_is_private_and_open_pages_survive_a_restart(arc_run, review_browser):
    client = review_browser(arc_run)
    token = client.token()
    assert (arc_run / "review" / "csrf.key").stat().st_mode & 0o077 == 0  # readable by its owner alone
    restarted = review_browser(arc_run)
    assert restarted.token() != token  # another browser session, another token
    restarted.client.cookies = client.client.cookies  # the first browser, after the app restarted
    assert restarted.token() == token
