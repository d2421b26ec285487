#!/usr/bin/env bash
# The GPU figures of issue #27, in one results file (JSON lines), within its own time limit (460 s by default; under 8 minutes on one H200):
#   environment   python, torch, CUDA, the device
#   training      whalefast's fit path against a plain PyTorch loop, ResNet-50 at 224 px, batch 128, bf16 autocast and
#                 channels-last (the reference recipe's settings), in turns: images/s, ratio and its spread, stages per
#                 batch (data wait included), GPU utilisation, peak memory, the reference's 20 epochs of 64 286 items projected
#   phash, inference   prepare's hashing rates; submit's embedding rate (two views a photo)
#   flukes epoch  one epoch of the flukes recipe (efficientnet-lite0, arcface, 112x224) by stage
# A section that fails or finds no time left is recorded as such; the others still run.
#
#   bench/gpu.sh --dry-run                     # CPU-sized, about a minute: what the test suite runs
#   bench/gpu.sh --results $OUT/gpu.jsonl      # on the GPU machine (see bench/RESULTS.md, "GPU", for the device call)
#
# On a machine without whalefast's training libraries, wheels in .whl/ (bench/gpu_wheels.sh fetches them) are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
results=""
limit=460
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --results) results=$2; shift ;;
        --limit) limit=$2; shift ;;
        *) echo "usage: bench/gpu.sh [--dry-run] [--results FILE] [--limit SECONDS]" >&2; exit 2 ;;
    esac
    shift
done
results=${results:-${OUT:-bench}/gpu-results.jsonl}
mkdir -p "$(dirname "$results")" && : >"$results" || exit 1

if ! python3 -c "import fastai, imagehash, pytorch_metric_learning" 2>/dev/null; then
    [ -d .whl ] || { echo "bench/gpu.sh: fastai, imagehash or pytorch-metric-learning missing and no .whl/ folder (run bench/gpu_wheels.sh)" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
deadline=$(($(date +%s) + limit))

section() { # NAME COMMAND...: run COMMAND --results FILE in the time left; record a failure or a skip
    local name=$1 left=$((deadline - $(date +%s)))
    shift
    if [ "$left" -le 10 ]; then
        echo "{\"section\": \"$name\", \"skipped\": \"no time left\"}" >>"$results"
        return
    fi
    timeout "$left" "$@" --results "$results"
    local rc=$?
    [ $rc = 0 ] || echo "{\"section\": \"$name\", \"failed\": \"exit $rc\"}" >>"$results"
}

python3 -c '
import json, os, platform, torch
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(json.dumps({"section": "environment", "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, "device": device, "cpus": os.cpu_count()}))
' >>"$results" || exit 1

data=$(mktemp -d)/data
if [ $dry = 1 ]; then
    images="--whales 20 --train-images 120 --test-images 40"
    training="--arch whale-resnet --size 32 --bs 16 --steps 2 --rounds 2 --min-samples 2"
    flukes="--steps 2 --rounds 1"
else
    images="--whales 4250 --train-images 9850 --test-images 1000"
    training="--arch resnet50 --size 224 --bs 128 --steps 15 --rounds 5 --min-samples 10"
    flukes="--steps 20 --rounds 3"
fi
left() { local t=$((deadline - $(date +%s))); echo $((t > 0 ? t : 1)); }
timeout "$(left)" python3 -m whalefast synth --out "$data" $images >/dev/null &&
    timeout "$(left)" python3 -m whalefast prepare --data "$data" --min-samples 10 >/dev/null || {
    echo '{"section": "data", "failed": "synth or prepare did not finish"}' >>"$results"
    exit 1
}
section training python3 bench/train_throughput.py --data "$data" $training
section "flukes epoch" python3 bench/train_throughput.py --data "$data" --recipe-epoch flukes $flukes --skip-extras
echo "results in $results"
