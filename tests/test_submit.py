import pandas as pd
import pytest
from typer.testing import CliRunner

from whalefast.cli import app
from whalefast.core.errors import WhalefastError
from whalefast.core.files import write_csv
from whalefast.data.prepared import image_cache
from whalefast.match.matcher import Matcher
from whalefast.stages.evaluate import evaluate
from whalefast.stages.submit import apply_matches, submit


def _answers(tmp_path):
    answers = pd.DataFrame({"Image": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "Id": ["w_1", "w_2", "new_whale", "w_3"]})
    write_csv(answers, tmp_path / "answers.csv")
    write_csv(pd.DataFrame({"Image": ["t1.jpg", "t2.jpg", "t3.jpg"], "Id": ["w_1", "w_2", "w_3"]}), tmp_path / "train.csv")
    return tmp_path / "answers.csv"


def _submission(tmp_path, rows, name="sub.csv"):
    pd.DataFrame(rows, columns=["Image", "Id"]).to_csv(tmp_path / name, index=False)
    return tmp_path / name


def test_evaluate_hand_computed(tmp_path):
    answers = _answers(tmp_path)
    sub = _submission(
        tmp_path,
        [
            ("a.jpg", "w_1 w_2 w_3 new_whale"),  # rank 1
            ("b.jpg", "new_whale w_1 w_2"),  # rank 3
            ("c.jpg", "w_1 new_whale"),  # rank 2
            ("d.jpg", "w_1 w_2 new_whale"),  # miss
        ],
    )
    r = evaluate(sub, answers)
    assert r["map5"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 0) / 4)
    assert r["map5_catalogued"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert r["map5_new_whale"] == pytest.approx(0.5)
    assert r["top1"] == pytest.approx(0.25)
    assert r["single_photo_ids"] == 3  # every catalogued id has one photo in train.csv
    assert r["map5_single_photo_ids"] == pytest.approx(r["map5_catalogued"])


@pytest.mark.parametrize(
    "rows, header, message",
    [
        ([("a.jpg", "w_1")] * 2, "Image,Id", "appears twice"),
        ([("a.jpg", "w_1"), ("b.jpg", "w_2"), ("c.jpg", "w_1")], "Image,Id", "no row for d.jpg"),
        ([("a.jpg", "w_1"), ("x.jpg", "w_1")], "Image,Id", "x.jpg is not a test image"),
        ([("a.jpg", "w_1 w_2 w_3 new_whale w_1 w_2")], "Image,Id", "at most 5"),
        ([("a.jpg", "w_9")], "Image,Id", "unknown id w_9"),
        ([("a.jpg", "w_1")], "image,id", "header must be Image,Id"),
    ],
)
def test_evaluate_rejects_malformed_submissions(tmp_path, rows, header, message):
    answers = _answers(tmp_path)
    path = tmp_path / "bad.csv"
    path.write_text(header + "\n" + "".join(f"{i},{ids}\n" for i, ids in rows))
    with pytest.raises(WhalefastError, match=message):
        evaluate(path, answers)
    result = CliRunner().invoke(app, ["evaluate", str(path), str(answers)])
    assert result.exit_code == 1 and message.split()[0] in result.output and "Traceback" not in result.output


def test_hash_matches_go_first_each_id_once():
    assert apply_matches(["new_whale", "w_a", "w_b", "w_c", "w_d"], ["w_b"]) == ["w_b", "new_whale", "w_a", "w_c", "w_d"]
    assert apply_matches(["w_a", "w_b"], []) == ["w_a", "w_b"]


def test_submit_format_and_evaluate(tiny_softmax, tiny_data, tmp_path):
    run_dir, _ = tiny_softmax
    out = tmp_path / "submission.csv"
    summary = submit(tiny_data, run_dir, out)
    sub = pd.read_csv(out)
    answers = pd.read_csv(tiny_data / "test_answers.csv")
    assert list(sub.columns) == ["Image", "Id"] and sorted(sub.Image) == sorted(answers.Image)
    assert all(len(ids.split()) == 5 and len(set(ids.split())) == 5 for ids in sub.Id)
    matches = pd.read_csv(tiny_data / "prepared" / "test_matches.csv")
    for image, group in matches.groupby("Image"):
        assert sub.set_index("Image").Id[image].split()[0] == group.sort_values("distance").Id.iloc[0]
    assert summary["rows"] == len(answers)
    # Every other photo is ranked as the run's Matcher ranks it, from the photo as the run's input spec decodes it.
    matcher = Matcher(run_dir)
    others = [n for n in sub.Image if n not in set(matches.Image)]
    images = image_cache(tiny_data, tiny_data / "prepared", "test", others, matcher.spec)
    ranked = matcher.rank(matcher.scores([images[n] for n in others]))
    assert [sub.set_index("Image").Id[n] for n in others] == [" ".join(i for i, _ in r) for r in ranked]
    assert evaluate(out, tiny_data / "test_answers.csv")["images"] == len(answers)


def test_a_share_of_the_batch_is_refused_with_its_reason(arc_run):
    matcher = Matcher(arc_run)
    assert matcher.batch_share_refusal(99, 0.0) is None and matcher.batch_share_refusal(100, 0.5) is None
    assert matcher.batch_share_refusal(99, 0.5).startswith("99 readable photos, too few")
    matcher.threshold = None  # as a run that trains new_whale as a class has
    assert "trains new_whale as a class" in matcher.batch_share_refusal(1000, 0.5)


def test_submit_places_new_whale_by_the_batch_threshold_the_run_or_the_option_asks_for(arc_run, tiny_data, tmp_path, monkeypatch, capsys):
    import json

    import torch

    import whalefast.match.matcher as matcher_module

    calibrated = submit(tiny_data, arc_run, tmp_path / "calibrated.csv")  # the run's fit setting: 0
    assert calibrated["new_whale_threshold"] == calibrated["calibrated_threshold"] is not None
    few = submit(tiny_data, arc_run, tmp_path / "few.csv", new_whale_share=0.9)
    assert few["new_whale_threshold"] == calibrated["calibrated_threshold"]  # 40 test photos, under BATCH_SHARE_FROM: too few to take a share of
    assert "40 readable photos, too few to place new_whale by a share of them" in capsys.readouterr().err

    monkeypatch.setattr(matcher_module, "BATCH_SHARE_FROM", 10)
    config = arc_run / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "new_whale_share": 0.9}))
    shared = submit(tiny_data, arc_run, tmp_path / "shared.csv")  # the run's fit setting now: 0.9
    assert "not applied" not in capsys.readouterr().err  # the warning follows the matcher's own limit
    matcher = Matcher(arc_run)
    names = pd.read_csv(tiny_data / "test_answers.csv").Image.tolist()
    images = image_cache(tiny_data, tiny_data / "prepared", "test", names, matcher.spec)
    scores = matcher.scores([images[n] for n in names])
    expected = (matcher.threshold + float(torch.quantile(scores.max(1).values, 0.9))) / 2
    assert shared["new_whale_threshold"] == pytest.approx(expected) and expected != pytest.approx(matcher.threshold)
    matched = set(pd.read_csv(tiny_data / "prepared" / "test_matches.csv").Image)
    rows = pd.read_csv(tmp_path / "shared.csv").set_index("Image").Id
    ranked = matcher.rank(scores, threshold=shared["new_whale_threshold"])
    assert [rows[n] for n in names if n not in matched] == [" ".join(i for i, _ in r) for n, r in zip(names, ranked) if n not in matched]
    assert shared["new_whale_first"] != calibrated["new_whale_first"]

    result = CliRunner().invoke(
        app,
        [
            "submit",
            "--data",
            str(tiny_data),
            "--model",
            "arcface",
            "--models-dir",
            str(arc_run.parent),
            "--out",
            str(tmp_path / "cli.csv"),
            "--new-whale-share",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert pd.read_csv(tmp_path / "cli.csv").equals(pd.read_csv(tmp_path / "calibrated.csv"))  # the option beats the run's setting
    result = CliRunner().invoke(app, ["submit", "--data", str(tiny_data), "--model", "arcface", "--models-dir", str(arc_run.parent), "--new-whale-share", "1"])
    assert result.exit_code == 1 and "--new-whale-share must be at least 0 and below 1, got 1.0" in result.output
