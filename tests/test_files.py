"""whalefast.core.files: strict JSON, atomic writes that honour the umask, spreadsheet-safe CSV."""

import json
import os

import pandas as pd
import pytest

from whalefast.core.files import from_spreadsheet_safe, read_safe_csv, safe_csv_text, spreadsheet_safe, to_json, write_csv


def test_json_is_always_valid():
    text = to_json({"threshold": float("nan"), "scores": [1.0, float("inf"), -float("inf")]})
    assert json.loads(text) == {"threshold": None, "scores": [1.0, None, None]}


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_csv(pd.DataFrame({"a": [1]}), tmp_path / "shared.csv")
        os.umask(0o077)
        write_csv(pd.DataFrame({"a": [1]}), tmp_path / "private.csv")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.csv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.csv").stat().st_mode & 0o777 == 0o600


def test_an_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "submission.csv"

    def boom(self, path, **kw):
        open(path, "w").write("Image,Id\nhalf")
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with pytest.raises(KeyboardInterrupt):
        write_csv(pd.DataFrame({"Image": ["a"], "Id": ["w"]}), target)
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "'quoted", "plain", ""])
def test_spreadsheet_safe_text_round_trips(text):
    safe = spreadsheet_safe(text)
    assert safe[:1] not in ("=", "+", "-", "@", "\t", "\r") and from_spreadsheet_safe(safe) == text


def test_only_the_named_columns_are_neutralised(tmp_path):
    df = pd.DataFrame({"comment": ["=cmd|' /C calc'!A0", "ok"], "score": ["-0.25", "0.5"]})
    text = safe_csv_text(df, ["comment"])
    assert "'=cmd" in text and "\n-0.25" not in text and ",-0.25" in text  # numbers stay numbers
    write_csv(df, tmp_path / "log.csv", user_text=["comment"])
    assert read_safe_csv(tmp_path / "log.csv", ["comment"]).equals(df)
