"""Training throughput of whalefast's fit path vs a plain PyTorch loop written the way the reference was.

Both train the same model at the same image size and batch size on the same generated dataset and
the same (oversampled) training list, built once each and timed in turns of --steps batches for
--rounds rounds (the ratio is the median of the rounds', with its range); the fit path's time per
batch by stage comes from learn.callbacks.StageTimes. Also measures the pHash rate (plain sequential
loop vs prepare's parallel and cached path) and submit's inference rate. Each section can be
appended to a results file as a JSON line (bench/gpu.sh collects them).

    python bench/train_throughput.py --quick            # CPU, about a minute, ends with "ratio whalefast/plain: R (rounds LOW-HIGH)"
    python bench/train_throughput.py --arch resnet50 --size 224 --bs 128 --steps 15 --rounds 5 --train-images 9850 --whales 4250
    python bench/train_throughput.py --data DIR --recipe-epoch flukes --steps 10 --rounds 3   # one epoch of a recipe, by stage
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import imagehash
import torch
import torchvision.transforms as T
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from PIL import Image

from whalefast.core.spec import InputSpec
from whalefast.data.dedup import hash_images
from whalefast.data.prepared import image_cache
from whalefast.data.split import oversampling_splitter
from whalefast.data.synth import SynthConfig, generate
from whalefast.learn.callbacks import StageTimes
from whalefast.learn.trainer import make_learner, training_data
from whalefast.nets.forward import embed
from whalefast.nets.registry import build_model
from whalefast.nets.views import average_probabilities
from whalefast.runs.config import FitConfig, resolve_input_spec
from whalefast.stages.prepare import PrepareConfig, prepare

REFERENCE_ITEMS = 64_286  # the reference's oversampled training items per epoch (it trained 20 epochs in 12 641 s)


class Window(Callback):
    """Stop the fit after `steps` + 1 training batches; the last `steps` are timed (the first restarts the data loader)."""

    order = 2000  # after StageTimes' last marks

    def __init__(self, steps: int):
        self.steps, self.seen, self.start, self.seconds = steps, 0, None, None

    def after_batch(self):
        if not self.training:
            return
        self.seen += 1
        if self.seen == 1:
            sync()
            self.start = time.perf_counter()
        if self.seen == self.steps + 1:
            sync()
            self.seconds = time.perf_counter() - self.start
            raise CancelFitException()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class GpuUse:
    """Mean GPU utilisation (nvidia-ml) sampled every 0.1 s while the block runs; None without a GPU or NVML."""

    def __init__(self):
        self.samples, self.stop = [], threading.Event()

    def __enter__(self):
        if torch.cuda.is_available():
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.1):
            try:
                self.samples.append(torch.cuda.utilization())
            except Exception:  # noqa: BLE001 - no NVML: no figure
                return

    def __exit__(self, *exc):
        self.stop.set()

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def whalefast_path(args, data: Path, recipe: str | None = None):
    """whalefast's fit path (cache, batch transforms, fastai Learner) as a function timing `steps` batches, and its StageTimes."""
    options = dict(data=data, arch=args.arch, size=args.size, bs=args.bs, lr=0.01, pretrained=False, epochs=1000, min_samples=args.min_samples)
    options |= dict(models_dir=Path(tempfile.mkdtemp()), name="bench", num_workers=args.workers, compile=args.compile)
    if recipe:
        options |= dict(recipe=recipe, arch=None, size=None, bs=None, lr=None, min_samples=None)
    cfg = FitConfig.from_options({k: v for k, v in options.items() if v is not None})
    spec = resolve_input_spec(cfg)
    learn = make_learner(cfg, spec, training_data(cfg, spec), metrics=False)  # metrics run at validation, which the timed steps never reach
    learn.remove_cbs([ProgressCallback])
    stages = StageTimes(skip=1)

    def window(steps: int) -> float:
        timer = Window(steps)
        learn.fit(1000, lr=cfg.lr, cbs=[timer, *stages.callbacks()])
        return timer.seconds

    return window, stages, learn


class PlainDataset(torch.utils.data.Dataset):
    """The reference's data path: PIL decode and torchvision transforms for every item, every epoch."""

    def __init__(self, folder: Path, names: list[str], labels: list[int], size: int):
        self.folder, self.names, self.labels = folder, names, labels
        self.tfm = T.Compose(
            [
                T.Resize((size, size)),
                T.RandomHorizontalFlip(),
                T.RandomVerticalFlip(),
                T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        with Image.open(self.folder / self.names[i]) as im:
            return self.tfm(im.convert("RGB")), self.labels[i]


def plain_path(args, data: Path):
    """A plain PyTorch loop (DataLoader with workers, torch SGD, MultiStepLR; channels-last and bf16 autocast on CUDA, as the fit path) as a function timing `steps` batches, and its data wait."""
    import pandas as pd

    split = pd.read_csv(data / "prepared" / "split.csv", keep_default_na=False)
    split = split[split.is_valid | (split.Id != "new_whale")].reset_index(drop=True)
    train_idx, _ = oversampling_splitter(args.min_samples)(split)
    vocab = sorted(set(split.Id[~split.is_valid]))
    code = {v: i for i, v in enumerate(vocab)}
    rows = split.iloc[train_idx]
    dataset = PlainDataset(data / "train", rows.Image.tolist(), [code[i] for i in rows.Id], args.size)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1) if cuda else 0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.bs, shuffle=True, num_workers=workers, pin_memory=cuda, drop_last=True, persistent_workers=workers > 0
    )
    model = build_model(args.arch, len(vocab)).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[16, 19], gamma=0.1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    waits = {"data": 0.0, "batches": 0}

    def batches():
        while True:
            yield from loader
            sched.step()

    stream = batches()

    def step(timed: bool) -> None:
        start = time.perf_counter()
        x, y = next(stream)
        x, y = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last), y.to(device, non_blocking=True)
        if timed:
            sync()
            waits["data"] += time.perf_counter() - start
            waits["batches"] += 1
        opt.zero_grad()
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def window(steps: int) -> float:
        step(False)  # as the fit path's first batch: not timed
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step(True)
        sync()
        return time.perf_counter() - start

    return window, waits


def phash_rates(data: Path) -> dict:
    """Images/s hashing train/: a plain sequential loop, prepare's parallel path (cold), and its cache (warm)."""
    names = sorted(p.name for p in (data / "train").iterdir())
    start = time.perf_counter()
    for n in names:
        with Image.open(data / "train" / n) as im:
            imagehash.phash(im.convert("RGB"))
    plain = len(names) / (time.perf_counter() - start)
    start = time.perf_counter()
    cold = hash_images(data / "train", names)
    parallel = len(names) / (time.perf_counter() - start)
    start = time.perf_counter()
    hash_images(data / "train", names, cache=cold)
    cached = len(names) / (time.perf_counter() - start)
    return {"plain": plain, "parallel": parallel, "cached": cached}


def inference_rate(args, data: Path) -> float:
    """Images/s of submit's scoring path (from the decoded cache, mirror TTA), through the one embed path."""
    names = sorted(p.name for p in (data / "test").iterdir())
    spec = InputSpec(size=(args.size, args.size), mirror=True)
    images = image_cache(data, data / "prepared", "test", names, spec)
    model = build_model(args.arch, 100).eval().to("cuda" if torch.cuda.is_available() else "cpu")
    arrays = [images[n] for n in names]
    embed(model, arrays[: args.bs], spec, average_probabilities, bs=args.bs)
    sync()
    start = time.perf_counter()
    embed(model, arrays, spec, average_probabilities, bs=args.bs)
    sync()
    return 2 * len(arrays) / (time.perf_counter() - start)  # two views a photo


def compare(args, data: Path) -> dict:
    """The fit path and the plain loop, built once each, timed in turns of `steps` batches for `rounds` rounds: rates, ratio per round, stages."""
    paths = {}
    paths["whalefast"], stages, _ = whalefast_path(args, data)
    paths["plain"], waits = plain_path(args, data)
    rates, peaks, use = {k: [] for k in paths}, dict.fromkeys(paths, 0.0), {k: [] for k in paths}
    for r in range(args.rounds):  # in turns, so a slow moment of the machine hits both alike
        for name, window in paths.items():
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            with GpuUse() as gpu:
                rates[name].append(args.steps * args.bs / window(args.steps))
            use[name].append(gpu.mean)
            if torch.cuda.is_available():
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**30)
        print(f"round {r + 1}: whalefast {rates['whalefast'][-1]:.1f} img/s, plain {rates['plain'][-1]:.1f} img/s", flush=True)
    ratios = [w / p for w, p in zip(rates["whalefast"], rates["plain"])]
    per_batch = stages.per_batch()
    return {
        "rates": {k: statistics.median(v) for k, v in rates.items()},
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "stages_s_per_batch": per_batch,
        "plain_data_wait_s_per_batch": waits["data"] / max(waits["batches"], 1),
        "gpu_utilisation": {k: statistics.mean(u) if all(x is not None for x in u) else None for k, u in use.items()},
        "peak_gib": peaks if torch.cuda.is_available() else None,
    }


def recipe_epoch(args, data: Path, name: str) -> dict:
    """Seconds of one training epoch of recipe `name` on `data`, by stage (validation excluded), from `steps` x `rounds` timed batches."""
    window, stages, learn = whalefast_path(args, data, recipe=name)
    for _ in range(args.rounds):
        window(args.steps)
    batches = len(learn.dls.train)
    per_batch = stages.per_batch()
    return {
        "recipe": name,
        "batches_per_epoch": batches,
        "bs": learn.dls.train.bs,
        "epoch_s": sum(per_batch.values()) * batches,
        "stages_s_per_epoch": {k: v * batches for k, v in per_batch.items()},
    }


def report(results: Path | None, section: str, figures: dict) -> None:
    """Print a section and append it to `results` as one JSON line."""
    print(f"{section}: {json.dumps(figures, default=float)}", flush=True)
    if results is not None:
        with open(results, "a") as f:
            f.write(json.dumps({"section": section, **figures}, default=float) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU comparison in about two minutes (resnet18, 64 px)")
    parser.add_argument("--data", type=Path, help="an existing prepared dataset; default: generate one")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--bs", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed batches per path and round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of turns between the two paths")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--min-samples", type=int, default=10)
    parser.add_argument("--train-images", type=int, default=2500)
    parser.add_argument("--whales", type=int, default=300)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--recipe-epoch", metavar="RECIPE", help="instead: one epoch of this recipe (flukes), by stage")
    parser.add_argument("--results", type=Path, help="append each section as a JSON line to this file")
    parser.add_argument("--skip-extras", action="store_true", help="no pHash and inference sections")
    args = parser.parse_args()
    if args.quick:
        args.arch, args.size, args.bs, args.steps, args.rounds = "resnet18", 64, 32, 4, 7
        args.train_images, args.whales = min(args.train_images, 400), min(args.whales, 60)

    data = args.data
    if data is None:
        data = Path(tempfile.mkdtemp()) / "data"
        generate(data, SynthConfig(seed=0, whales=args.whales, train_images=args.train_images, test_images=max(40, args.train_images // 10)))
    if not (data / "prepared" / "split.csv").exists():
        prepare(data, cfg=PrepareConfig(min_samples=args.min_samples), quiet=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    if args.recipe_epoch:
        print(f"device: {device}; one epoch of the {args.recipe_epoch} recipe, {args.rounds} x {args.steps} timed batches")
        report(args.results, f"{args.recipe_epoch} epoch", {"device": device, **recipe_epoch(args, data, args.recipe_epoch)})
        return
    print(f"device: {device}; {args.arch} at {args.size}px, batch {args.bs}, {args.rounds} rounds of {args.steps} timed batches per path")
    figures = compare(args, data)
    figures["reference_20_epochs_s"] = {k: 20 * REFERENCE_ITEMS / v for k, v in figures["rates"].items()}
    report(args.results, "training", {"device": device, "arch": args.arch, "size": args.size, "bs": args.bs, **figures})
    if not args.skip_extras:
        ph = phash_rates(data)
        report(args.results, "phash", {"images_per_s": ph})
        report(args.results, "inference", {"images_per_s": inference_rate(args, data)})
    print(f"ratio whalefast/plain: {figures['ratio']:.2f} (rounds {figures['ratio_min']:.2f}-{figures['ratio_max']:.2f})")


if __name__ == "__main__":
    main()
