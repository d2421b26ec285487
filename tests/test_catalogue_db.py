"""The catalogue database under the review app and matching: crashes mid-burst, two writers, filtered candidates, migration of old runs."""

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pandas as pd
import pytest

from whalefast.db.filters import parse_filter
from whalefast.db.store import CatalogueStore
from whalefast.match.matcher import Matcher
from whalefast.review.logic import Review
from whalefast.runs.folder import Run
from whalefast.stages.predict import predict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`whalefast serve` in a process of its own, driven over HTTP as a browser tab would."""

    def __init__(self, run_dir, port=None):
        self.run_dir, self.port = run_dir, port or _free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "whalefast", "serve", "--model", run_dir.name, "--models-dir", str(run_dir.parent), "--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = httpx.Client(base_url=self.origin, headers={"Origin": self.origin}, timeout=60)
        deadline = time.time() + 120
        while True:
            try:
                self.client.get("/")
                break
            except httpx.TransportError:
                assert time.time() < deadline and self.process.poll() is None, "the server did not start"
                time.sleep(0.2)

    def token(self, page="/"):
        return re.search(r'name="csrf" value="([0-9a-f]+)"', self.client.get(page).text).group(1)

    def upload(self, name, data):
        answer = self.client.post("/upload", data={"csrf": self.token()}, files=[("files", (name, data, "image/jpeg"))])
        assert answer.status_code == 200, answer.text

    def decide(self, qid, **form):
        return self.client.post(f"/query/{qid}/decide", data={"csrf": self.token(f"/query/{qid}"), **form}, follow_redirects=False)

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self):
        self.process.terminate()
        self.process.wait(30)


def _query_photos(tiny_data, n):
    answers = pd.read_csv(tiny_data / "test_answers.csv")
    return [(name, (tiny_data / "test" / name).read_bytes()) for name in answers.Image[:n]]


def _consistent(run_dir) -> tuple[dict, int]:
    """Per query, its decisions; and the photos the review added to the catalogue. Every 'added' decision has its photo and no photo lacks its decision."""
    with CatalogueStore(run_dir.parent / "catalogue.db") as store:
        decisions = store.query("SELECT query, decision, individual, catalogue FROM decisions ORDER BY id")
        reviewed = store.query("SELECT digest, individual FROM photos WHERE source = 'review'")
    by_query = {}
    for d in decisions:
        by_query.setdefault(d["query"], []).append(dict(d))
    added = [d for ds in by_query.values() for d in ds if d["catalogue"] == "added"]
    assert len(added) == len(reviewed), (added, reviewed)
    assert sorted(d["individual"] for d in added) == sorted(r["individual"] for r in reviewed)
    return by_query, len(reviewed)


@pytest.mark.slow
def test_a_server_killed_mid_burst_loses_no_acknowledged_decision(arc_run, tiny_data):
    server = Server(arc_run)
    photos = _query_photos(tiny_data, 8)
    for name, data in photos:
        server.upload(name, data)
    qids = list(Review(arc_run).queue)
    assert len(qids) == 8
    acknowledged, failed = {}, []

    def burst():
        for i, qid in enumerate(qids):
            try:
                answer = server.decide(qid, decision="new", new_id=f"w_burst{i}", expected="0")
                if answer.status_code == 303:
                    acknowledged[qid] = f"w_burst{i}"
            except httpx.TransportError:
                failed.append(qid)

    sender = threading.Thread(target=burst)
    sender.start()
    deadline = time.time() + 120
    while len(acknowledged) < 3 and time.time() < deadline:
        time.sleep(0.01)
    server.kill()
    sender.join(60)
    assert 3 <= len(acknowledged) < 8, acknowledged

    by_query, reviewed = _consistent(arc_run)
    for qid, wid in acknowledged.items():
        assert [(d["decision"], d["individual"]) for d in by_query[qid]] == [("new", wid)]  # present exactly once
    restarted = Server(arc_run)
    try:
        for qid in qids:
            if qid not in by_query:
                assert restarted.decide(qid, decision="new", new_id=f"w_after_{qid[:6]}", expected="0").status_code == 303
        again = restarted.decide(next(iter(acknowledged)), decision="unsure", expected="0")
        assert again.status_code == 409 and "already decided" in again.text
    finally:
        restarted.stop()
    by_query, reviewed = _consistent(arc_run)
    assert sorted(by_query) == sorted(qids) and reviewed == 8 and all(len(ds) == 1 for ds in by_query.values())


@pytest.mark.slow
def test_two_servers_on_one_database_lose_nothing_and_refuse_the_second_decision(arc_run, tiny_data):
    first, second = Server(arc_run), Server(arc_run)
    try:
        photos = _query_photos(tiny_data, 6)
        for name, data in photos:
            first.upload(name, data)
        qids = [q for q in Review(arc_run).queue]
        assert len(qids) == 6 and '"/query/' in second.client.get("/").text  # the second server sees the first one's queue
        answers = {}

        def decide(server, tag, mine):
            for qid in mine:
                answers[(tag, qid)] = server.decide(qid, decision="new", new_id=f"w_{tag}_{qid[:6]}", expected="0").status_code

        shared = qids[0]
        threads = [
            threading.Thread(target=decide, args=(first, "a", [shared, *qids[1:3]])),
            threading.Thread(target=decide, args=(second, "b", [shared, *qids[3:]])),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted([answers[("a", shared)], answers[("b", shared)]]) == [303, 409]  # one wins, the other is told
        assert all(answers[(t, q)] == 303 for t, q in answers if q != shared)
        by_query, reviewed = _consistent(arc_run)
        assert reviewed == 6 and all(len(ds) == 1 for ds in by_query.values()) and sorted(by_query) == sorted(qids)
        # A candidate the other server added is proposed here too.
        catalogue = Run.open(arc_run).catalogue()
        assert {f"w_b_{q[:6]}" for q in qids[3:]} <= set(catalogue.ids)
    finally:
        first.stop()
        second.stop()


@pytest.mark.slow
def test_filtered_matching_never_proposes_a_filtered_out_whale(arc_run, tiny_data, tmp_path):
    with CatalogueStore(arc_run.parent / "catalogue.db") as store:
        rows = store.query("SELECT id, individual FROM photos ORDER BY id")
        ids = sorted({r["individual"] for r in rows})
        north = set(ids[: len(ids) // 2])
        with store.transaction() as db:  # sightings: half the whales photographed in the north
            db.executemany(
                "UPDATE photos SET locality = ?, event_date = '2020-06-01' WHERE id = ?",
                [("North" if r["individual"] in north else "South", r["id"]) for r in rows],
            )
    photos = [tiny_data / "test" / name for name in pd.read_csv(tiny_data / "test_answers.csv").Image[:10]]
    everywhere = predict(photos, Matcher(arc_run), top=5)
    only_north = predict(photos, Matcher(arc_run, photo_filter=parse_filter(["locality=North"])), top=5)
    proposed = {m["id"] for r in only_north for m in r["matches"]} - {"new_whale"}
    assert proposed and proposed <= north
    assert {m["id"] for r in everywhere for m in r["matches"]} - {"new_whale"} - north  # unfiltered, the south is proposed too
    nothing = Matcher(arc_run, photo_filter=parse_filter(since="2021-01-01"))
    assert [m["id"] for m in predict(photos[:1], nothing, top=5)[0]["matches"]] == ["new_whale"]

    review = Review(arc_run)
    query = review.add(photos[0].name, photos[0].read_bytes())
    assert {c.id for c in review.candidates(query.qid, 10, parse_filter(["locality=North"]))} <= north


@pytest.mark.slow
def test_a_run_from_before_the_database_is_migrated_once(arc_run, tiny_data, capsys):
    import torch

    run = Run.open(arc_run)
    catalogue = run.catalogue()
    with CatalogueStore(run.catalogue_db) as store:
        digest_of = dict(store.query("SELECT id, digest FROM photos"))
    legacy = {
        "embeddings": catalogue.embeddings.float(),
        "labels": catalogue.labels,
        "ids": catalogue.ids,
        "photos": catalogue.photos,
        "digests": [digest_of[p] for p in catalogue.photo_ids.tolist()],
    }
    torch.save(legacy, arc_run / "catalogue.pt")
    (arc_run.parent / "catalogue.db").unlink()
    for extra in ("-wal", "-shm"):
        (arc_run.parent / f"catalogue.db{extra}").unlink(missing_ok=True)
    config = json.loads((arc_run / "config.json").read_text())
    migrated = Run.open(arc_run).catalogue()
    notice = capsys.readouterr().err
    assert "migrated" in notice and "catalogue.pt" in notice and "is left as it was" in notice
    assert migrated.photos == catalogue.photos and torch.allclose(migrated.embeddings.float(), catalogue.embeddings.float(), atol=1e-3)
    Run.open(arc_run).catalogue()
    assert "migrated" not in capsys.readouterr().err  # once
    assert (arc_run / "catalogue.pt").is_file() and json.loads((arc_run / "config.json").read_text()) == config
