"""bench/gpu.sh, the GPU figures' script: its CPU-sized dry run writes every section, with figures that hang together."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from whalefast.learn.callbacks import STAGES

ROOT = Path(__file__).resolve().parents[1]


def sections(results: Path) -> dict[str, dict]:
    return {s["section"]: s for s in map(json.loads, results.read_text().splitlines())}


@pytest.mark.slow
def test_gpu_script_dry_run_writes_every_section(tmp_path):
    results = tmp_path / "gpu.jsonl"
    run = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--results", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = sections(results)
    assert list(found) == ["environment", "training", "phash", "inference", "flukes epoch"]
    training = found["training"]
    assert training["arch"] == "whale-resnet" and training["rates"]["whalefast"] > 0 and training["rates"]["plain"] > 0
    assert training["ratio_min"] <= training["ratio"] <= training["ratio_max"]
    assert set(training["stages_s_per_batch"]) == set(STAGES) and training["stages_s_per_batch"]["forward"] > 0
    assert training["reference_20_epochs_s"]["plain"] == pytest.approx(20 * 64_286 / training["rates"]["plain"])
    assert found["inference"]["images_per_s"] > 0 and found["phash"]["images_per_s"]["cached"] > 0
    flukes = found["flukes epoch"]
    assert flukes["recipe"] == "flukes" and flukes["batches_per_epoch"] > 0
    assert flukes["epoch_s"] == pytest.approx(sum(flukes["stages_s_per_epoch"].values()))


def test_gpu_script_stops_within_its_time_limit_and_says_what_did_not_finish(tmp_path):
    results = tmp_path / "gpu.jsonl"
    run = subprocess.run(
        ["bash", "bench/gpu.sh", "--dry-run", "--limit", "1", "--results", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1
    found = sections(results)
    assert found["environment"]["device"] and found["data"] == {"section": "data", "failed": "synth or prepare did not finish"}


def test_gpu_script_refuses_an_unknown_option():
    run = subprocess.run(["bash", "bench/gpu.sh", "--fast"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "usage: bench/gpu.sh" in run.stderr
