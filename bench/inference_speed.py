"""Batch inference on a CPU: each way of running a finished run's network, side by side, in images/s and in test MAP@5.

On one finished run (with its prepared data):
- submit: photos/s embedding test photos already decoded (prepare's cache), through the run's views
  (test-time scales), for eager PyTorch as whalefast ran it before (no_grad), inference mode,
  channels-last, bf16 autocast, int8 dynamic quantisation, ONNX Runtime, and ONNX Runtime int8;
  interleaved rounds, medians;
- predict FOLDER: photos/s from the photo files (decode, box model, crop, network, search), one photo
  at a time as before and with the parallel loader, eager and ONNX;
- with test_answers.csv in the data folder: each runtime's test MAP@5 through submit and evaluate,
  and its lowest cosine to eager PyTorch's embeddings (for the runtimes at least 1.5x as fast as eager).

    python bench/inference_speed.py --run models/demo-arcface --data data/demo
    python bench/inference_speed.py --run /tmp/whalefast-real-XXXX/models/arcface-predicted --data /tmp/whalefast-real-XXXX/data
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from whalefast.data.layout import test_images
from whalefast.data.prepared import image_cache
from whalefast.match.matcher import Matcher
from whalefast.match.photos import PhotoLoader
from whalefast.nets.runtime import Bfloat16Network, OnnxNetwork
from whalefast.runs.folder import Run
from whalefast.stages.evaluate import evaluate
from whalefast.stages.submit import submit

SETTLE = 1.0  # seconds between timings: the last runtime's spinning worker threads go idle, as in a process that runs one runtime


class InferenceMode(nn.Module):
    """The network under torch.inference_mode (no autograd bookkeeping at all)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x):
        with torch.inference_mode():
            return self.network(x).clone()


class ChannelsLast(InferenceMode):
    """Weights and photos in channels-last memory layout (oneDNN's preferred one for convolutions)."""

    def __init__(self, network: nn.Module):
        super().__init__(copy.deepcopy(network).to(memory_format=torch.channels_last))

    def forward(self, x):
        return super().forward(x.contiguous(memory_format=torch.channels_last))


def int8_dynamic(network: nn.Module) -> nn.Module:
    """torch's dynamic int8 quantisation of the linear layers (convolutions stay float)."""
    return InferenceMode(torch.ao.quantization.quantize_dynamic(copy.deepcopy(network), {nn.Linear}, dtype=torch.qint8))


def onnx_int8(graph: Path, work: Path) -> nn.Module:
    """ONNX Runtime on the graph with int8 weights (onnxruntime.quantization.quantize_dynamic)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / "int8.onnx"
    quantize_dynamic(str(graph), str(out), weight_type=QuantType.QInt8)
    return OnnxNetwork(str(out))


def variants(run: Run, work: Path) -> dict[str, nn.Module]:
    """Each way of running the run's network, built from its weights."""
    eager = run.network()
    onnx = run.onnx_network()
    return {
        "eager (no_grad, before)": eager,
        "inference mode": InferenceMode(eager),
        "channels-last": ChannelsLast(eager),
        "bf16 autocast (--runtime bf16)": Bfloat16Network(eager),
        "int8 dynamic (torch)": int8_dynamic(eager),
        "onnx runtime (the default)": onnx,
        "onnx runtime int8": onnx_int8(run / Run.ONNX, work),
    }


def submit_rates(matcher: Matcher, networks: dict[str, nn.Module], arrays: list, rounds: int) -> dict[str, float]:
    """Photos/s of each network embedding `arrays` through the run's views, interleaved rounds, medians."""
    rates = {name: [] for name in networks}
    for network in networks.values():  # warm-up: first calls pick kernels
        matcher.network = network
        matcher.outputs(arrays[:8])
    order = list(networks)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:  # each round starts one further on: no runtime always follows the same one
            matcher.network = networks[name]
            time.sleep(SETTLE)
            start = time.perf_counter()
            matcher.outputs(arrays)
            rates[name].append(len(arrays) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def predict_rates(matcher: Matcher, networks: dict[str, nn.Module], paths: list[Path], rounds: int) -> dict[str, float]:
    """Photos/s from files to rankings: one photo at a time (as predict loaded them before) and with the parallel loader."""
    ways = {}
    for name, runtime in (("eager (no_grad, before)", "eager"), ("onnx runtime (the default)", "onnx")):
        loader = PhotoLoader(matcher.spec, runtime)  # its box model run the same way
        ways[f"{name}, one photo at a time"] = (networks[name], lambda loader=loader: [loader.load(p)[0] for p in paths])
        ways[f"{name}, parallel loader"] = (networks[name], lambda loader=loader: [a for a, _ in loader.load_many(paths)])
    rates = {name: [] for name in ways}
    for _, (network, load) in ways.items():  # warm-up: the box model loads on first use
        matcher.network = network
        matcher.ranked(load()[:2])
    for _ in range(rounds):
        for name, (network, load) in ways.items():
            matcher.network = network
            time.sleep(SETTLE)
            start = time.perf_counter()
            matcher.ranked(load())
            rates[name].append(len(paths) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def accuracy(matcher: Matcher, networks: dict[str, nn.Module], data: Path, work: Path) -> dict[str, tuple[float, float]]:
    """Per network: (test MAP@5 through submit and evaluate, lowest cosine of its test embeddings to eager PyTorch's)."""
    names = test_images(data)
    images = image_cache(data, data / "prepared", "test", names, matcher.spec)
    arrays = [images[n] for n in names if n not in images.problems]
    reference, out = None, {}
    for name, network in networks.items():
        matcher.network = network
        outputs = matcher.outputs(arrays)
        reference = outputs if reference is None else reference
        scores = evaluate(submit(data, matcher, work / "submission.csv")["out"], data / "test_answers.csv")
        out[name] = (scores["map5"], float(torch.nn.functional.cosine_similarity(outputs, reference).min()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished arcface or softmax run")
    parser.add_argument("--data", type=Path, required=True, help="its data folder, prepared (test_answers.csv there adds the MAP@5 column)")
    parser.add_argument("--photos", type=int, default=96, help="test photos per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-accuracy", action="store_true", help="skip the MAP@5 over the whole test set")
    args = parser.parse_args()
    run = Run.open(args.run)
    print(f"{run.name}: {run.settings.arch} at {run.spec.size}, {len(run.spec.scales)} scales, mirror {run.spec.mirror}; {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        matcher = Matcher(run, runtime="eager")
        networks = variants(run, work)
        names = test_images(args.data)[: args.photos]
        images = image_cache(args.data, args.data / "prepared", "test", names, matcher.spec)
        arrays = [images[n] for n in names if n not in images.problems]
        submit_rate = submit_rates(matcher, networks, arrays, args.rounds)
        base = submit_rate["eager (no_grad, before)"]
        print(f"\nsubmit (decoded photos, {len(arrays)} per round, median of {args.rounds}) photos/s  ratio to before")
        for name, rate in submit_rate.items():
            print(f"  {name:<36} {rate:>8.1f} {rate / base:>6.2f}")
        folder = [args.data / "test" / n for n in names[: max(8, args.photos // 2)]]
        predict_rate = predict_rates(matcher, networks, folder, args.rounds)
        base = predict_rate["eager (no_grad, before), one photo at a time"]
        print(f"\npredict FOLDER (from files, {len(folder)} photos) photos/s  ratio to before")
        for name, rate in predict_rate.items():
            print(f"  {name:<50} {rate:>8.1f} {rate / base:>6.2f}")
        if not args.no_accuracy and (args.data / "test_answers.csv").is_file():
            print("\ntest MAP@5 (every test photo)      MAP@5  vs eager  lowest cosine to eager")
            fast = {
                name: network
                for name, network in networks.items()
                if name.startswith("eager (") or submit_rate[name] >= 1.5 * submit_rate["eager (no_grad, before)"]
            }
            scores = accuracy(matcher, fast, args.data, work)  # only the runtimes worth choosing
            eager = scores["eager (no_grad, before)"][0]
            for name, (map5, cosine) in scores.items():
                print(f"  {name:<32} {map5:.4f} {map5 - eager:+.4f} {cosine:.6f}")


if __name__ == "__main__":
    main()
