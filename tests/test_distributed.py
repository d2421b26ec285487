import os
import shutil
import subprocess

import pandas as pd
import pytest
import torch

from whalefast.data import image_cache, load_split, training_items
from whalefast.inference import load_model, run_model
from whalefast.metrics import map5_calibrated


def test_two_cpu_processes_train_one_model(tiny_data, tmp_path):
    """The README's command: `torchrun --nproc_per_node 2 -m whalefast fit --distributed ...` on gloo."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    models = tmp_path / "models"
    command = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "-m",
        "whalefast",
        "fit",
        "--distributed",
        "--data",
        str(tiny_data),
        "--arch",
        "whale-resnet",
        "--no-pretrained",
        "--size",
        "32",
        "--bs",
        "16",
        "--epochs",
        "2",
        "--milestones",
        "1",
        "--lr",
        "0.02",
        "--name",
        "ddp",
        "--models-dir",
        str(models),
        "--min-samples",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for rank in (0, 1):
        trained = [line for line in output.splitlines() if f"rank {rank}: trained" in line]
        assert trained and int(trained[0].split("trained")[1].split()[0]) > 0, output[-3000:]

    run_dir = models / "ddp"
    files = sorted(p.name for p in run_dir.iterdir())
    assert files == ["calibration.json", "config.json", "curves.png", "history.csv", "last.pth", "model.pth", "status.json"]
    history = pd.read_csv(run_dir / "history.csv")
    assert history.epoch.tolist() == [0, 1]

    # The MAP@5 reported for the best epoch (validation gathered from both ranks) equals a
    # single-process evaluation of the saved weights over the whole validation set.
    model, cfg, _ = load_model(run_dir, torch.device("cpu"))
    items, _ = training_items(load_split(tiny_data / "prepared"))
    valid = items[items.is_valid]
    images = image_cache(tiny_data, tiny_data / "prepared", "train", items.Image.tolist(), cfg.size)
    logits = run_model(model, [images[n] for n in valid.Image], bs=64, tta=False)
    code = {v: i for i, v in enumerate(cfg.vocab)}
    targets = torch.tensor([code.get(t, -100) for t in valid.target])
    best = int(history.valid_loss.idxmin())
    assert history.map5[best] == pytest.approx(map5_calibrated(logits, targets), abs=1e-4)
