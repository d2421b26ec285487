"""Training throughput of whalefast's fit path vs a plain PyTorch loop written the way the reference was.

Both train the same model at the same image size, batch size and number of steps on the same
generated dataset and the same (oversampled) training list. Also measures the pHash rate (plain
sequential loop vs prepare's parallel and cached path) and submit's inference rate.

    python bench/train_throughput.py --quick            # CPU, < 2 minutes, ends with "ratio whalefast/plain: R"
    python bench/train_throughput.py --arch resnet50 --size 224 --bs 128 --steps 50 --train-images 9850
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
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
from whalefast.learn.trainer import make_learner, training_data
from whalefast.nets.forward import embed
from whalefast.nets.registry import build_model
from whalefast.nets.views import average_probabilities
from whalefast.runs.config import FitConfig, resolve_input_spec
from whalefast.stages.prepare import PrepareConfig, prepare


class StepTimer(Callback):
    """Time `steps` training batches after `warmup` ones, then stop the fit."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.seen, self.start = warmup, steps, 0, None

    def after_batch(self):
        if not self.training:
            return
        self.seen += 1
        if self.seen == self.warmup:
            self.sync()
            self.start = time.perf_counter()
        if self.seen == self.warmup + self.steps:
            self.sync()
            self.seconds = time.perf_counter() - self.start
            raise CancelFitException()

    @staticmethod
    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def whalefast_rate(args, data: Path) -> float:
    """Images/s of whalefast's fit path (cache, GPU batch transforms, fastai Learner)."""
    cfg = FitConfig(
        data=str(data),
        arch=args.arch,
        size=args.size,
        bs=args.bs,
        lr=0.01,
        pretrained=False,
        epochs=1000,
        min_samples=args.min_samples,
        models_dir=tempfile.mkdtemp(),
        name="bench",
        num_workers=args.workers,
        compile=args.compile,
    )
    spec = resolve_input_spec(cfg)
    learn = make_learner(cfg, spec, training_data(cfg, spec), metrics=False)  # metrics run at validation, which the timed steps never reach
    learn.remove_cbs([ProgressCallback])
    timer = StepTimer(args.warmup, args.steps)
    learn.fit(1000, lr=0.01, cbs=[timer])
    return args.steps * args.bs / timer.seconds


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


def plain_rate(args, data: Path) -> float:
    """Images/s of a plain PyTorch loop: DataLoader with workers, torch SGD, MultiStepLR."""
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
    workers = args.workers if args.workers is not None else (8 if cuda else 0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.bs, shuffle=True, num_workers=workers, pin_memory=cuda, drop_last=True)
    model = build_model(args.arch, len(vocab)).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[16, 19], gamma=0.1)
    seen, start = 0, None
    while True:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            seen += 1
            if seen == args.warmup:
                StepTimer.sync()
                start = time.perf_counter()
            if seen == args.warmup + args.steps:
                StepTimer.sync()
                return args.steps * args.bs / (time.perf_counter() - start)
        sched.step()


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
    StepTimer.sync()
    start = time.perf_counter()
    embed(model, arrays, spec, average_probabilities, bs=args.bs)
    StepTimer.sync()
    return len(arrays) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU comparison in under two minutes (resnet18, 64 px)")
    parser.add_argument("--data", type=Path, help="an existing prepared dataset; default: generate one")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--bs", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--min-samples", type=int, default=10)
    parser.add_argument("--train-images", type=int, default=2500)
    parser.add_argument("--whales", type=int, default=300)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.arch, args.size, args.bs, args.steps, args.warmup, args.repeats = "resnet18", 64, 32, 12, 2, 2
        args.train_images, args.whales = min(args.train_images, 400), min(args.whales, 60)

    data = args.data
    if data is None:
        data = Path(tempfile.mkdtemp()) / "data"
        generate(data, SynthConfig(seed=0, whales=args.whales, train_images=args.train_images, test_images=max(40, args.train_images // 10)))
    if not (data / "prepared" / "split.csv").exists():
        prepare(data, cfg=PrepareConfig(min_samples=args.min_samples), quiet=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; {args.arch} at {args.size}px, batch {args.bs}, {args.steps} timed steps after {args.warmup}, {args.repeats} repeats")

    results = {"whalefast": [], "plain": []}
    for r in range(args.repeats):  # interleaved, so drift in machine load hits both paths alike
        results["whalefast"].append(whalefast_rate(args, data))
        results["plain"].append(plain_rate(args, data))
        print(f"repeat {r + 1}: whalefast {results['whalefast'][-1]:.1f} img/s, plain {results['plain'][-1]:.1f} img/s")
    med = {k: statistics.median(v) for k, v in results.items()}
    for k, v in med.items():
        print(f"{k}: median {v:.1f} img/s")
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    ph = phash_rates(data)
    print(f"pHash img/s: plain loop {ph['plain']:.1f}, prepare parallel {ph['parallel']:.1f}, prepare cached {ph['cached']:.1f}")
    print(f"submit inference img/s (flip TTA): {inference_rate(args, data):.1f}")
    print(f"ratio whalefast/plain: {med['whalefast'] / med['plain']:.2f}")


if __name__ == "__main__":
    main()
