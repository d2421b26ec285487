"""Inference runtimes: networks exported to ONNX give PyTorch's outputs, are exported once per weights, and spare inference timm and torchvision."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from whalefast.cli import app
from whalefast.core.errors import WhalefastError
from whalefast.match.matcher import Matcher
from whalefast.nets.heads import BoxHead, EmbeddingHead
from whalefast.nets.registry import build_model, get_arch
from whalefast.nets.runtime import AGREEMENT, Bfloat16Network, OnnxNetwork, agreement, export_onnx, resolve_runtime
from whalefast.runs.folder import Run


@pytest.mark.parametrize(
    ("arch", "head", "size"),
    [
        ("efficientnet-lite0", "parts", (48, 96)),  # strips of a 2x3 map: uneven halves
        ("resnet18", "embedding", (40, 72)),
        ("whale-resnet", "classifier", (32, 32)),
        ("efficientnet-lite0", "boxes", (64, 64)),
    ],
)
def test_an_exported_network_gives_pytorchs_outputs_at_every_batch_and_photo_size(arch, head, size):
    torch.manual_seed(0)
    features = get_arch(arch).features
    heads = {
        "parts": EmbeddingHead(features, 32, 7, 0.4, 30.0, parts=2, training=False),
        "embedding": EmbeddingHead(features, 32, 7, 0.4, 30.0, training=False),
        "classifier": None,
        "boxes": BoxHead(features),
    }
    network = build_model(arch, 7, head=heads[head]).eval()
    exported = OnnxNetwork(export_onnx(network, size, "test"))
    assert exported.source == "test"
    assert agreement(network, exported, size) > 1 - AGREEMENT  # at 6/7 and 8/7 of the size too
    x = torch.randn(5, 3, size[0] + 16, size[1] + 8)  # a batch and size it was not exported at
    with torch.no_grad():
        assert torch.allclose(exported(x), network(x), atol=1e-4)


def test_an_export_that_disagrees_with_pytorch_is_refused(monkeypatch):
    import whalefast.nets.runtime as runtime

    network = build_model("whale-resnet", 3).eval()
    monkeypatch.setattr(runtime, "agreement", lambda *args: 0.95)
    with pytest.raises(WhalefastError, match=r"differ from PyTorch's \(cosine 0.95000"):
        export_onnx(network, (32, 32), "test")


def test_auto_runs_onnx_on_a_cpu_and_pytorch_on_a_gpu():
    assert resolve_runtime("auto", torch.device("cpu")) == "onnx"
    assert resolve_runtime("auto", torch.device("cuda")) == "eager"
    assert resolve_runtime("eager", torch.device("cpu")) == "eager"
    assert resolve_runtime("bf16", torch.device("cpu")) == "bf16" and resolve_runtime("bf16", torch.device("cuda")) == "eager"  # a GPU's eager is bf16
    with pytest.raises(WhalefastError, match="runs on the CPU"):
        resolve_runtime("onnx", torch.device("cuda"))
    with pytest.raises(WhalefastError, match="unknown runtime 'tensorrt'; choose one of: auto, onnx, bf16, eager"):
        resolve_runtime("tensorrt", torch.device("cpu"))


def photos(count: int = 6) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(count, 48, 96, 3), dtype=np.uint8)


def test_onnx_matching_ranks_as_pytorch_does_and_bf16_nearly(arc_run):
    eager, onnx, bf16 = (Matcher(arc_run, runtime=r) for r in ("eager", "onnx", "bf16"))
    assert isinstance(onnx.network, OnnxNetwork) and isinstance(bf16.network, Bfloat16Network) and not isinstance(eager.network, (OnnxNetwork, Bfloat16Network))
    assert torch.nn.functional.cosine_similarity(eager.outputs(photos()), onnx.outputs(photos())).min() > 1 - AGREEMENT
    assert [[i for i, _ in r] for r in eager.ranked(photos())] == [[i for i, _ in r] for r in onnx.ranked(photos())]
    close = torch.nn.functional.cosine_similarity(eager.outputs(photos()), bf16.outputs(photos()))
    assert 0.95 < close.min() and close.min() < 1 - 1e-5  # bfloat16 keeps 8 bits of mantissa: near, never the same


def test_the_graph_is_exported_once_per_weights_and_again_when_they_change_or_it_is_damaged(arc_run, tiny_softmax):
    run = Run.open(arc_run)
    graph = run / Run.ONNX
    graph.unlink(missing_ok=True)
    Matcher(arc_run)
    written = graph.stat().st_mtime_ns
    Matcher(arc_run)
    assert graph.stat().st_mtime_ns == written  # loaded, not exported again
    graph.write_bytes(b"not a graph")
    Matcher(arc_run)
    assert OnnxNetwork(str(graph)).source.startswith(Run.open(arc_run).weights_digest)
    Run.open(tiny_softmax[0]).onnx_network()
    graph.write_bytes((tiny_softmax[0] / Run.ONNX).read_bytes())  # a graph exported from other weights
    Matcher(arc_run)
    assert OnnxNetwork(str(graph)).source.startswith(run.weights_digest)


def test_a_run_folder_that_cannot_be_written_exports_for_the_command_only(arc_run, monkeypatch, capsys):
    import whalefast.runs.folder as folder

    def refuse(data, path):
        raise WhalefastError(f"{path}: read-only folder")

    (arc_run / Run.ONNX).unlink(missing_ok=True)
    monkeypatch.setattr(folder, "write_bytes", refuse)
    matcher = Matcher(arc_run)
    assert isinstance(matcher.network, OnnxNetwork) and len(matcher.ranked(photos(2))) == 2
    assert not (arc_run / Run.ONNX).exists()
    assert "read-only folder; the exported network serves this command only" in capsys.readouterr().err
    from whalefast.stages.export import export_onnx as export_run

    with pytest.raises(WhalefastError, match="could not be written"):  # an explicit export must leave a file
        export_run(arc_run)


def test_export_command_writes_the_graph_and_reports_its_agreement(arc_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--model", "arcface", "--models-dir", str(arc_run.parent), "--onnx", "--out", str(tmp_path / "whales.onnx")])
    assert result.exit_code == 0, result.output
    assert "1.0000" in result.output and (arc_run / Run.ONNX).is_file()
    assert (tmp_path / "whales.onnx").read_bytes() == (arc_run / Run.ONNX).read_bytes()
    refused = runner.invoke(app, ["export", "--model", "arcface", "--models-dir", str(arc_run.parent)])
    assert refused.exit_code == 1 and refused.output.strip() == "error: say which format to export: --onnx"
    wrong = runner.invoke(app, ["predict", str(tmp_path / "whales.onnx"), "--model", "arcface", "--models-dir", str(arc_run.parent), "--runtime", "fast"])
    assert wrong.exit_code == 1 and "unknown runtime 'fast'" in wrong.output


def test_matching_with_an_exported_graph_loads_neither_timm_torchvision_nor_pandas(arc_run):
    Run.open(arc_run).onnx_network()  # exported (which needs the PyTorch network) before the fresh interpreter starts
    code = (
        "import sys, numpy as np\n"
        "from whalefast.match.matcher import Matcher\n"
        f"m = Matcher({str(arc_run)!r})\n"
        "m.ranked(list(np.zeros((1, 48, 96, 3), dtype=np.uint8)))\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'timm', 'torchvision', 'fastai', 'pandas'}), 'torch._dynamo' in sys.modules)"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[] False"


def test_a_fit_embeds_through_onnx_runtime_only_where_the_export_pays(monkeypatch):
    import whalefast.nets.runtime as runtime

    network = build_model("efficientnet-lite0", 7, head=EmbeddingHead(get_arch("efficientnet-lite0").features, 32, 7, 0.4, 30.0, training=False)).eval()
    enough = -(-runtime.EXPORT_FROM_PIXELS // (48 * 96))  # photo views of 48x96 pixels
    assert runtime.embedding_network(network, (48, 96), enough - 1) is network
    assert runtime.embedding_network(network, (96, 192), enough // 4 - 1) is network  # a quarter as many views of 4x the pixels: still short
    exported = runtime.embedding_network(network, (48, 96), enough)
    assert isinstance(exported, OnnxNetwork)
    x = torch.randn(3, 3, 48, 96)
    with torch.no_grad():
        assert torch.allclose(exported(x), network(x), atol=1e-4)

    def refused(*args, **kwargs):
        raise WhalefastError("cannot export this network to ONNX")

    monkeypatch.setattr(runtime, "export_onnx", refused)
    assert runtime.embedding_network(network, (48, 96), enough) is network  # eager still embeds, only slower


@pytest.mark.slow
def test_a_fit_that_embeds_through_onnx_runtime_scores_and_calibrates_as_eager_pytorch(tiny_data, tiny_config, tmp_path, monkeypatch):
    import whalefast.nets.runtime as runtime
    from whalefast.learn.trainer import fit

    settings = dict(name="arcface", method="arcface", embed_dim=64, scale=16.0, epochs=2, map_every=1)
    eager = fit(tiny_config(tiny_data, tmp_path / "eager", **settings))
    exports = []
    export = runtime.export_onnx
    monkeypatch.setattr(runtime, "export_onnx", lambda network, size, source: exports.append(source) or export(network, size, source))
    monkeypatch.setattr(runtime, "EXPORT_FROM_PIXELS", 1)
    onnx = fit(tiny_config(tiny_data, tmp_path / "onnx", **settings))
    assert exports.count("a fit's weights") == 2  # each epoch's validation MAP@5; calibration reuses the last one's outputs
    assert onnx["valid_map5"] == pytest.approx(eager["valid_map5"], abs=1e-6) and onnx["valid_top1"] == pytest.approx(eager["valid_top1"], abs=1e-6)
    assert onnx["threshold"] == pytest.approx(eager["threshold"], abs=1e-4)
