"""Faults a photo-ID team meets in a season: killed stages, full disks, read-only folders, odd input. Each failed before its fix."""

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest
from typer.testing import CliRunner

from whalefast.cli import app
from whalefast.core.errors import WhalefastError
from whalefast.data.synth import SynthConfig, generate
from whalefast.learn.callbacks import Checkpoints
from whalefast.learn.trainer import fit
from whalefast.runs.folder import Run
from whalefast.stages.prepare import PrepareConfig, prepare

runner = CliRunner()
FAST = ["--arch", "whale-resnet", "--no-pretrained", "--size", "32", "--bs", "16", "--epochs", "1", "--milestones", ""]


def _one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _error_line(result) -> str:
    """The one error line of a failed command (progress lines may come before it)."""
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code != 0 and len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.fixture
def fast_config(tiny_config):
    """fast_config(data, models, **settings): a fit of seconds, the reference's small ResNet at 32 px."""
    fast = dict(arch="whale-resnet", pretrained=False, size=32, bs=16, epochs=1, milestones=(), opt="sgd", lr=0.02)
    return lambda data, models, **kw: tiny_config(data, models, **{**fast, **kw})


def _gone(pids: list[int], timeout: float = 15) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


SLOW_PREPARE = """
import sys, time
from whalefast.data import dedup
from whalefast.stages import prepare
dedup.hash_one = lambda path: time.sleep(600)  # workers that would decode for minutes
prepare.prepare(sys.argv[1], quiet=True)
"""

KILLED_AFTER_SPLIT = """
import os, sys
from whalefast.stages import prepare
prepare.choose_boxes = lambda *a, **k: os._exit(9)  # killed after split.csv, before boxes.csv and prepare.json
prepare.prepare(sys.argv[1], cfg=prepare.PrepareConfig(boxes=sys.argv[2]), quiet=True)
"""


@pytest.mark.slow
def test_a_killed_prepare_takes_its_workers_along_and_leaves_a_folder_fit_refuses(data_copy, tmp_path):
    job = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, str(data_copy)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(job.pid)
    deadline = time.time() + 60
    while not parent.children() and time.time() < deadline:
        time.sleep(0.1)
    workers = [c.pid for c in parent.children()]
    assert workers, "prepare started no worker processes"
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert _gone(workers), "prepare's workers outlived it"

    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_SPLIT, str(data_copy), str(data_copy / "boxes.csv")])
    assert killed.returncode == 9 and (data_copy / "prepared" / "split.csv").is_file()
    assert not (data_copy / "prepared" / "prepare.json").exists()
    line = _one_line(runner.invoke(app, ["fit", "--data", str(data_copy), "--models-dir", str(tmp_path), *FAST]))
    assert "a prepare that did not finish left it (no prepare.json); run `whalefast prepare` again" in line
    submitted = runner.invoke(app, ["submit", "--data", str(data_copy), "--model", "x", "--models-dir", str(tmp_path)])
    assert "did not finish" in _one_line(submitted)


POOL_AFTER_ONNX = """
import gc, time
import torch
from whalefast.core.parallel import process_pool
from whalefast.nets.runtime import OnnxNetwork, export_onnx

gc.disable()  # the garbage below stays for the workers to find
network = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
garbage = [OnnxNetwork(export_onnx(network, (32, 32), source="a test"), threads=2)]
garbage[0](torch.zeros(2, 3, 32, 32))
garbage.append(garbage)  # a cycle: only a full collection frees the session, and its thread pool
del garbage
time.sleep(1)  # the session's threads now wait on their condition variables
with process_pool(2) as pool:
    print("collected", sum(pool.map(gc.collect, [2, 2])))
"""


@pytest.mark.slow
def test_workers_started_after_an_onnx_session_finish():
    # A worker forked from this process would collect the session's copy and wait forever in its destructor
    # (it hung CI in test_synth after the fit tests had used ONNX Runtime).
    try:
        done = subprocess.run([sys.executable, "-c", POOL_AFTER_ONNX], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the pool's workers hung collecting the ONNX session they inherited")
    assert done.returncode == 0 and done.stdout.startswith("collected"), done.stderr


def test_prepare_checks_every_input_before_writing_anything(data_copy):
    cases = [
        (["--boxes", "nope"], "--boxes nope: neither a boxes CSV nor a box model folder"),
        (["--seed", "-1"], "--seed must lie in 0.."),
        (["--unseen-pct", "-1"], "--unseen-pct must lie between 0 and 1, got -1"),
        (["--unseen-pct", "5"], "--unseen-pct must lie between 0 and 1, got 5"),
        (["--min-samples", "-3"], "--min-samples must be at least 1, got -3"),
    ]
    for args, message in cases:
        assert message in _one_line(runner.invoke(app, ["prepare", "--data", str(data_copy), *args])), args
        assert not (data_copy / "prepared").exists(), args
    prepare(data_copy, quiet=True)
    finished = (data_copy / "prepared" / "prepare.json").read_bytes()
    _one_line(runner.invoke(app, ["prepare", "--data", str(data_copy), "--boxes", "nope"]))
    assert (data_copy / "prepared" / "prepare.json").read_bytes() == finished  # the finished folder is still whole


def test_temporary_files_of_killed_runs_are_removed(data_copy):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = data_copy / "prepared" / "cache"
    cache.mkdir(parents=True)
    stale = [cache / f".train-48x96.u8.{dead.pid}-0a1b2c3d.tmp", data_copy / "prepared" / f".split.csv.{dead.pid}-0a1b2c3d.tmp"]
    ours = cache / f".train-48x96.u8.{os.getpid()}-0a1b2c3d.tmp"  # a live process's: still being written
    for f in [*stale, ours]:
        f.write_bytes(b"\0" * 1000)
    prepare(data_copy, cfg=PrepareConfig(boxes=str(data_copy / "boxes.csv")), quiet=True)
    assert not any(f.exists() for f in stale) and ours.exists()


SMALL_DISK = """
set -u
mount -t tmpfs -o size=64m tmpfs "$MNT" || exit 97
leave() {{ rm -f "$MNT/filler"; avail=$(df --output=avail -B1 "$MNT" | tail -n 1); head -c $((avail - $1)) /dev/zero > "$MNT/filler"; }}
{commands}
"""


def _on_a_small_disk(tmp_path, commands: str) -> str:
    """Run shell `commands` with $MNT a 64 MB tmpfs in a private mount namespace (`leave N` fills it up to N free bytes); their output."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    script = SMALL_DISK.format(commands=commands)
    env = {**os.environ, "MNT": str(mnt), "COLUMNS": "400"}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode == 97 or done.stdout.startswith("unshare:"):
        pytest.skip(f"cannot mount a small tmpfs here: {done.stdout.strip()[:200]}")
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare for a private tmpfs")
def test_a_full_disk_is_one_line_and_leaves_what_was_there(tiny_data, tiny_arcface, tmp_path):
    whalefast = f"{sys.executable} -m whalefast"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "learnt.json", "input.json", "model.pth", "calibration.json", "status.json"):
        shutil.copy(tiny_arcface[0] / name, run / name)
    with sqlite3.connect(tiny_arcface[0].parent / "catalogue.db") as source, sqlite3.connect(tmp_path / "catalogue.db") as copy:
        source.backup(copy)
    new = tmp_path / "new"
    new.mkdir()
    name = pd.read_csv(tiny_data / "test_answers.csv").Image[0]
    shutil.copy(tiny_data / "test" / name, new / name)
    (tmp_path / "new.csv").write_text(f"Image,Id\n{name},w_added\n")
    fast = " ".join(FAST[:-1]) + " ''"
    out = _on_a_small_disk(
        tmp_path,
        f"""
        leave 0; {whalefast} prepare --data {tiny_data} --out "$MNT/prep"; echo "prepare exit $?"; ls -A "$MNT/prep"; echo "prepare left ^"
        leave 100000; {whalefast} fit --data {tiny_data} --models-dir "$MNT/models" --name full {fast}; echo "fit exit $?"
        {whalefast} submit --data {tiny_data} --model full --models-dir "$MNT/models" --out "$MNT/s.csv"; echo "submit exit $?"
        rm -r "$MNT/filler" "$MNT/models" "$MNT/prep"; cp -r {run} "$MNT/run"; cp {tmp_path / "catalogue.db"} "$MNT/"; sha256sum "$MNT/catalogue.db"
        leave 4096; {whalefast} catalogue add --model run --models-dir "$MNT" --csv {tmp_path / "new.csv"} --images {new}; echo "add exit $?"
        sha256sum "$MNT/catalogue.db"; ls -A "$MNT"
        """,
    )
    assert "Traceback" not in out and "unexpected pos" not in out, out
    before, after = out.split("prepare left ^")
    assert "prepare exit 1" in before and "prep/hashes.csv: no space left on device" in before and ".tmp" not in before, out
    assert "fit exit 1" in after and "no space left on device" in after.split("fit exit")[0], out
    assert "submit exit 1" in after and "full: a fit that stopped" in after and "left no weights to resume; fit it again" in after, out
    digests = [line.split()[0] for line in out.splitlines() if line.endswith("/catalogue.db")]
    assert "add exit 1" in after and "catalogue.db: no space left on device" in after, out
    assert len(digests) == 2 and digests[0] == digests[1] and ".tmp" not in after.split("add exit")[1], out  # the catalogue is unchanged


@pytest.mark.slow
def test_a_read_only_data_folder_says_so_and_prepared_elsewhere_works(data_copy, tmp_path):
    prepared, models = tmp_path / "prepared", tmp_path / "models"
    as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    if as_user and shutil.which("setpriv") is None:
        pytest.skip("root ignores permissions without setpriv to drop CAP_DAC_OVERRIDE")
    for root, dirs, files in os.walk(data_copy):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o555 if name in dirs else 0o444)
    os.chmod(data_copy, 0o555)
    try:

        def whalefast(*args):
            return subprocess.run([*as_user, sys.executable, "-m", "whalefast", *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})

        refused = whalefast("prepare", "--data", str(data_copy))
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert f"{data_copy / 'prepared'}: cannot write here (permission denied); pass --out" in refused.stderr
        assert whalefast("prepare", "--data", str(data_copy), "--out", str(prepared)).returncode == 0
        fitted = whalefast("fit", "--data", str(data_copy), "--prepared", str(prepared), "--models-dir", str(models), "--name", "ro", *FAST)
        assert fitted.returncode == 0, fitted.stderr
        submitted = whalefast(
            "submit", "--data", str(data_copy), "--prepared", str(prepared), "--model", "ro", "--models-dir", str(models), "--out", str(tmp_path / "s.csv")
        )
        assert submitted.returncode == 0, submitted.stderr
        assert len(pd.read_csv(tmp_path / "s.csv")) == len(pd.read_csv(data_copy / "sample_submission.csv"))
    finally:
        for root, dirs, _ in os.walk(data_copy):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
        os.chmod(data_copy, 0o755)


@pytest.mark.slow
def test_a_fit_killed_before_its_weights_leaves_a_folder_marked_unfinished(tiny_data, tmp_path, monkeypatch, fast_config):
    original = Checkpoints.after_epoch

    def killed(self):
        raise KeyboardInterrupt  # after status, config and history were written, before any weights

    monkeypatch.setattr(Checkpoints, "after_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        fit(fast_config(tiny_data, tmp_path, name="cut"))
    assert json.loads((tmp_path / "cut" / "status.json").read_text()) == {"state": "training"}
    assert not (tmp_path / "cut" / "model.pth").exists()
    with pytest.raises(WhalefastError, match="cut: a fit that stopped after 1 epochs left no weights to resume; fit it again"):
        Run.open(tmp_path / "cut")

    def interrupted(self):
        original(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoints, "after_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(fast_config(tiny_data, tmp_path, name="cut", epochs=2))
    line = _one_line(runner.invoke(app, ["predict", str(tiny_data / "test"), "--model", "cut", "--models-dir", str(tmp_path)]))
    assert f"its fit stopped after 1 epochs and did not finish; continue it with `whalefast fit --name cut --models-dir {tmp_path} --resume`" in line
    monkeypatch.setattr(Checkpoints, "after_epoch", original)
    fit(fast_config(tiny_data, tmp_path, name="cut", epochs=2), resume=True)
    assert json.loads((tmp_path / "cut" / "status.json").read_text()) == {"state": "finished"}
    Run.open(tmp_path / "cut")

    monkeypatch.setattr(Checkpoints, "after_epoch", killed)  # a new fit over the finished run, killed: no mix of old and new
    with pytest.raises(KeyboardInterrupt):
        fit(fast_config(tiny_data, tmp_path, name="cut", lr=0.01))
    with pytest.raises(WhalefastError, match="did not finish|left no weights"):
        Run.open(tmp_path / "cut")


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "--num-workers", "-1"], "--num-workers must be 0 or more, got -1"),
        (["fit", "--size", "100000"], "--size must be at most 2048 pixels each way"),
        (["fit", "--method", "arcface", "--embed-dim", "100000000"], "--embed-dim must be at most 8192, got 100000000"),
        (["fit", "--seed", "-1"], "--seed must lie in 0.."),
        (
            ["fit", "--method", "arcface", "--parts", "5", "--size", "32x64"],
            "--parts must be at most 4 at --size 32x64: whale-resnet's feature map is 4x8 cells, got 5",
        ),
        (["fit", "--bs", "5000", "--size", "32"], "--bs 5000 is more than the"),
        (["boxes", "fit", "--boxes", "BOXES", "--bs", "0"], "--bs must be at least 1, got 0"),
        (["boxes", "fit", "--boxes", "BOXES", "--seed", "-1"], "--seed must lie in 0.."),
        (["fit", "--epochs", "x"], "Invalid value for '--epochs'"),
        (["fit", "--nosuch"], "No such option: --nosuch"),
    ],
)
def test_bad_values_are_one_line_errors(tiny_data, tmp_path, args, message):
    args = [a.replace("BOXES", str(tiny_data / "boxes.csv")) for a in args]
    fast = ["--arch", "whale-resnet", "--no-pretrained"] if args[0] == "fit" else []
    result = runner.invoke(app, [*args, "--data", str(tiny_data), "--models-dir", str(tmp_path), *fast])
    assert message in _error_line(result)
    assert not any(tmp_path.iterdir())


def test_a_symbolic_link_loop_is_skipped_and_listed(data_copy):
    (data_copy / "train" / "loop.jpg").symlink_to("loop.jpg")
    with open(data_copy / "train.csv", "a") as f:
        f.write("loop.jpg,w_loop\n")
    summary = prepare(data_copy, quiet=True)
    skipped = pd.read_csv(data_copy / "prepared" / "skipped.csv").set_index("Image")
    assert "symbolic links" in skipped.problem["loop.jpg"] and summary["skipped"] == 1


def test_markup_in_paths_and_ids_is_printed_as_it_is(tiny_softmax, tiny_data, tmp_path):
    odd = tmp_path / "a[/x]b" / "[old]"
    line = _one_line(runner.invoke(app, ["prepare", "--data", str(odd)]))
    assert f"{odd}: data folder not found" in line
    run_dir, _ = tiny_softmax
    photo = odd / "[bold]w.jpg"
    odd.mkdir(parents=True)
    shutil.copy(tiny_data / "test" / pd.read_csv(tiny_data / "test_answers.csv").Image[0], photo)
    shown = runner.invoke(app, ["predict", str(photo), "--model", run_dir.name, "--models-dir", str(run_dir.parent)])
    assert shown.exit_code == 0 and str(photo) in shown.stdout, shown.output


def test_submit_refuses_a_model_trained_on_other_data(tiny_softmax, tmp_path):
    other = tmp_path / "other"
    generate(other, SynthConfig(seed=9, whales=5, train_images=40, test_images=8), workers=1)
    prepare(other, quiet=True)
    run_dir, _ = tiny_softmax
    line = _one_line(
        runner.invoke(app, ["submit", "--data", str(other), "--model", run_dir.name, "--models-dir", str(run_dir.parent), "--out", str(tmp_path / "s.csv")])
    )
    assert "trained on other data than" in line and "are not in it" in line and not (tmp_path / "s.csv").exists()


def test_a_grown_train_csv_only_warns(tiny_softmax, data_copy, tmp_path):
    run_dir, _ = tiny_softmax
    prepare(data_copy, cfg=PrepareConfig(boxes=str(data_copy / "boxes.csv")), quiet=True)
    with open(data_copy / "train.csv", "a") as f:
        f.write("next-season.jpg,w_newcomer\n")  # other bytes; every id the model knows is still there
    result = runner.invoke(
        app, ["submit", "--data", str(data_copy), "--model", run_dir.name, "--models-dir", str(run_dir.parent), "--out", str(tmp_path / "s.csv")]
    )
    assert result.exit_code == 0 and f"changed after {run_dir.name} was trained" in result.stderr, result.output


def test_the_cli_starts_without_the_heavy_libraries():
    probe = "import sys, whalefast.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'fastai', 'pandas', 'numpy', 'PIL', 'timm'}))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"whalefast --help would import {loaded}"
    version = subprocess.run([sys.executable, "-m", "whalefast", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("whalefast ")


def test_no_space_errors_name_the_file(tmp_path, monkeypatch):
    from whalefast.core.files import save_torch, write_csv

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(WhalefastError, match=f"{tmp_path / 'a.csv'}: no space left on device"):
        write_csv(pd.DataFrame({"a": [1]}), tmp_path / "a.csv")
    monkeypatch.undo()
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WhalefastError, match="model.pth: no space left on device"):
        save_torch({"w": 1}, tmp_path / "model.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
