import os
import shutil
import subprocess

import pandas as pd
import pytest

from whalefast.data.loaders import TrainingData, training_items
from whalefast.data.prepared import image_cache, load_split
from whalefast.runs.folder import Run
from whalefast.runs.methods import Embedded


@pytest.mark.slow
def test_two_cpu_processes_train_one_model(tiny_data, tmp_path, fast_fit_args):
    """The README's command: `torchrun --nproc_per_node 2 -m whalefast fit --distributed ...` on gloo."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    models = tmp_path / "models"
    torchrun = ["torchrun", "--nproc_per_node", "2", "-m", "whalefast", "fit", "--distributed"]
    command = [*torchrun, "--data", str(tiny_data), *fast_fit_args, "--name", "ddp", "--models-dir", str(models)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for rank in (0, 1):
        trained = [line for line in output.splitlines() if f"rank {rank}: trained" in line]
        assert trained and int(trained[0].split("trained")[1].split()[0]) > 0, output[-3000:]

    run_dir = models / "ddp"
    files = sorted(p.name for p in run_dir.iterdir())
    assert files == ["calibration.json", "config.json", "curves.png", "history.csv", "input.json", "last.pth", "learnt.json", "model.pth", "status.json"]
    history = pd.read_csv(run_dir / "history.csv")
    assert history.epoch.tolist() == [0, 1]

    # The MAP@5 reported for the best epoch (scored on each rank over the whole validation set) equals a
    # single-process evaluation of the saved weights, through the same scoring path as calibration.
    run = Run.open(run_dir)
    items, vocab = training_items(load_split(tiny_data / "prepared"))
    images = image_cache(tiny_data, tiny_data / "prepared", "train", items.Image.tolist(), run.spec)
    data = TrainingData(None, items, vocab, images)
    _, map5, _ = run.method.score_validation(Embedded(run.method, run.network(), run.spec, data, bs=64))
    best = int(history.valid_loss.idxmin())
    assert history.map5[best] == pytest.approx(map5, abs=1e-4)
