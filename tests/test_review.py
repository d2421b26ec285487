import io
import shutil
import threading

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from whalefast.cli import app
from whalefast.review.logic import Review, ReviewError, check_upload
from whalefast.runs.folder import Run


def _photo_bytes(tiny_data, k=0) -> tuple[str, bytes]:
    answers = pd.read_csv(tiny_data / "test_answers.csv")
    name = answers.Image[k]
    return name, (tiny_data / "test" / name).read_bytes()


def test_uploads_that_are_not_photos_or_too_large_are_refused():
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    assert check_upload("ok.png", png.getvalue()) == ".png"
    with pytest.raises(ReviewError, match="not a photo") as e:
        check_upload("notes.txt", b"hello, not an image")
    assert e.value.status == 415
    with pytest.raises(ReviewError, match="too large") as e:
        check_upload("big.png", png.getvalue(), max_bytes=10)
    assert e.value.status == 413
    with pytest.raises(ReviewError, match="empty"):
        check_upload("empty.jpg", b"")


def test_review_ranks_decides_logs_and_grows_the_catalogue(arc_run, tiny_data, review_log):
    review = Review(arc_run)
    name, data = _photo_bytes(tiny_data)
    query = review.add(name, data)
    assert review.add(name, data) == query  # the same photo again is the same query
    assert review.progress() == (0, 1)
    candidates = review.candidates(query.qid, 3)
    assert [c.rank for c in candidates] == [1, 2, 3]
    assert len({c.id for c in candidates}) == 3
    assert candidates[0].score >= candidates[1].score >= candidates[2].score
    before = Run.open(arc_run).catalogue()
    top = candidates[0]
    assert top.photos, "every candidate comes with its catalogue photos"

    row = review.decide(query.qid, "same", top.id, comment="clear trailing edge", expected=0)
    assert (row["decision"], row["id"], row["rank"], row["catalogue"]) == ("same", top.id, "1", "added")
    assert (row["top_id"], row["score"], row["top_score"]) == (top.id, f"{top.score:.4f}", f"{top.score:.4f}")
    after = Run.open(arc_run).catalogue()
    assert after.embeddings.shape[0] == before.embeddings.shape[0] + 1
    assert after.ids[int(after.labels[-1])] == top.id
    assert after.photos[-1] == str(query.file.resolve())

    restarted = Review(arc_run)  # a restart keeps the queue and every decision
    assert list(restarted.queue) == [query.qid]
    assert restarted.status(query.qid) == "same" and restarted.progress() == (1, 1)
    log = review_log(arc_run)
    assert log[["decision", "id", "comment"]].values.tolist() == [["same", top.id, "clear trailing edge"]]
    with pytest.raises(ReviewError, match="already decided") as e:
        restarted.decide(query.qid, "unsure")
    assert e.value.status == 409
    assert len(review_log(arc_run)) == 1


def test_new_whale_decision_makes_it_findable(arc_run, tiny_data):
    review = Review(arc_run)
    name, data = _photo_bytes(tiny_data, 1)
    query = review.add(name, data)
    with pytest.raises(ReviewError, match="already a known whale"):
        review.decide(query.qid, "new", review.candidates(query.qid, 1)[0].id)
    with pytest.raises(ReviewError, match="needs an id"):
        review.decide(query.qid, "new", "")
    review.decide(query.qid, "new", "w_newbie")
    again = review.add("copy.jpg", data + b"\0")  # the same pixels, other bytes: a new query
    assert review.candidates(again.qid, 1)[0].id == "w_newbie"


def test_concurrent_decisions_keep_the_first_and_lose_nothing(arc_run, tiny_data, review_log):
    review = Review(arc_run)
    query = review.add(*_photo_bytes(tiny_data, 2))
    top = review.candidates(query.qid, 1)[0].id
    review.decide(query.qid, "unsure", comment="reviewer A", expected=0)
    with pytest.raises(ReviewError, match="another decision") as e:
        review.decide(query.qid, "same", top, comment="reviewer B", expected=0)  # B loaded the page before A decided
    assert e.value.status == 409

    results = []

    def decide(who):
        try:
            results.append(review.decide(query.qid, "same", top, comment=who)["comment"])
        except ReviewError as err:
            results.append(err.status)

    threads = [threading.Thread(target=decide, args=(f"reviewer {i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, results)).count("409") == 3
    log = review_log(arc_run)
    assert log.comment.tolist()[0] == "reviewer A" and len(log) == 2 and log.decision.tolist() == ["unsure", "same"]
    assert Run.open(arc_run).catalogue().photos.count(str(query.file.resolve())) == 1


def test_softmax_review_shows_training_photos_and_logs_only(tiny_softmax, tiny_data, tmp_path):
    run_dir = tmp_path / "softmax"
    shutil.copytree(tiny_softmax[0], run_dir)
    review = Review(run_dir)
    query = review.add(*_photo_bytes(tiny_data, 3))
    candidates = review.candidates(query.qid, 5)
    assert all(c.photos and review.known_photos[c.photos[0]].is_file() for c in candidates)
    row = review.decide(query.qid, "same", candidates[1].id)
    assert row["rank"] == "2" and row["catalogue"] == ""
    assert (row["score"], row["top_id"]) == (f"{candidates[1].score:.4f}", candidates[0].id)
    assert not (run_dir / "catalogue.pt").exists()


def test_pages_upload_decide_and_export(arc_run, tiny_data, review_browser):
    client = review_browser(arc_run)
    assert client.get("/").status_code == 200
    bad = client.post("/upload", files=[("files", ("notes.txt", b"not an image", "text/plain"))])
    assert bad.status_code == 400 and "notes.txt: not a photo" in bad.text
    name, data = _photo_bytes(tiny_data)
    ok = client.post("/upload", files=[("files", (name, data, "image/jpeg")), ("files", ("junk.jpg", b"junk", "image/jpeg"))])
    assert ok.status_code == 200 and "added 1 photo to the queue" in ok.text and "junk.jpg: not a photo" in ok.text
    qid = next(iter(client.review.queue))
    page = client.get(f"/query/{qid}?n=3")
    assert page.status_code == 200 and page.text.count('class="card cand"') == 3
    top = client.review.candidates(qid, 1)[0].id
    decided = client.post(f"/query/{qid}/decide", data={"same_id": top, "comment": "ok", "expected": "0"}, page=f"/query/{qid}", follow_redirects=False)
    assert decided.status_code == 303
    home = client.get(decided.headers["location"])
    assert f"{name}: same whale {top}" in home.text and "added to the catalogue" in home.text
    again = client.post(f"/query/{qid}/decide", data={"decision": "unsure", "expected": "0"})
    assert again.status_code == 409 and "already decided" in again.text
    export = client.get("/export.csv")
    assert export.status_code == 200 and pd.read_csv(io.BytesIO(export.content)).id.tolist() == [top]
    assert client.get("/query/nosuch").status_code == 404
    assert client.get("/photo/known/999999").status_code == 404


def test_serve_unknown_model_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--model", "nosuch", "--models-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no such model" in result.output and "Traceback" not in result.output


def test_huge_uploads_and_conflicting_catalogue_photos_get_a_message(arc_run, tiny_data, review_browser):
    client = review_browser(arc_run, max_upload_bytes=2000)
    name, data = _photo_bytes(tiny_data)
    assert len(data) > 2000
    big = client.post("/upload", files=[("files", (name, data, "image/jpeg"))])
    assert big.status_code == 400 and f"{name}: too large" in big.text and "the limit is 2 KB" in big.text

    review = Review(arc_run)
    cat = Run.open(arc_run).catalogue()
    known = cat.photos[0]
    owner = cat.ids[int(cat.labels[0])]
    other = next(i for i in review.known_ids() if i != owner)
    query = review.add("copy-of-a-catalogue-photo.jpg", open(known, "rb").read())
    with pytest.raises(ReviewError, match=f"already catalogued as {owner}") as e:
        review.decide(query.qid, "same", other)
    assert e.value.status == 409 and review.status(query.qid) == "pending"
    assert review.decide(query.qid, "same", owner)["catalogue"] == "already there"
