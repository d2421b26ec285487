"""How a trained network runs at inference: eager PyTorch, or ONNX Runtime on a graph exported from it.

On a CPU, ONNX Runtime embeds photos about twice as fast as eager PyTorch with the same outputs
(bench/inference_speed.py), and it needs neither timm nor torchvision, so a command that
matches one photo starts in half the time; a fit embeds its validation and catalogue photos the
same way (`embedding_network`). On a GPU eager PyTorch (bf16 autocast) stays.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
from torch import nn

from whalefast.core.errors import WhalefastError
from whalefast.core.images import scaled_size

RUNTIMES = {
    "auto": "ONNX Runtime on a CPU, eager PyTorch on a GPU",
    "onnx": "ONNX Runtime on a graph exported from the network (exported once, saved beside its weights)",
    "bf16": "PyTorch with bfloat16 autocast: on a CPU with AVX512-BF16 or AMX a little faster than ONNX Runtime for batches, not quite the same outputs",
    "eager": "PyTorch, layer by layer, as training runs it (bf16 autocast on a GPU)",
}
AGREEMENT = 1e-3  # an exported graph's cosine to the network's outputs may fall short of 1 by at most this
SOURCE_KEY = "whalefast_source"  # the exported graph's metadata: the weights and layout it was exported from
AGREEMENT_KEY = "whalefast_agreement"  # ... and its lowest cosine to the network's outputs when it was checked
OPSET = 17
# Exporting and checking a graph costs 2-3 s, after which a CPU embeds about twice as fast: worth it from
# about this many pixels of photo views (640 views at 112x224; the flukes recipe's validation MAP@5 and
# catalogue embed 380 million, a tiny test's fit 2 million).
EXPORT_FROM_PIXELS = 16_000_000


def check_runtime(name: str) -> str:
    """`name` if it is a runtime, else a one-line error listing them."""
    if name not in RUNTIMES:
        raise WhalefastError(f"unknown runtime {name!r}; choose one of: {', '.join(RUNTIMES)}")
    return name


def resolve_runtime(name: str, device: torch.device) -> str:
    """The runtime `name` means on `device`: "onnx", "bf16" or "eager" ("auto" is ONNX Runtime on a CPU only; on a GPU eager is bf16 already)."""
    if check_runtime(name) == "auto":
        return "onnx" if device.type == "cpu" else "eager"
    if name == "onnx" and device.type != "cpu":
        raise WhalefastError("--runtime onnx runs on the CPU; on a GPU use --runtime eager (or auto)")
    return "eager" if name == "bf16" and device.type != "cpu" else name


def embedding_network(network: nn.Module, size: tuple[int, int], views: int) -> nn.Module:
    """What a fit embeds `views` photo views of `size` with: on a CPU, where they pay for the export, its network's weights as they are now run by ONNX Runtime; else the network itself."""
    device = next(network.parameters(), torch.zeros(0)).device
    if views * size[0] * size[1] < EXPORT_FROM_PIXELS or resolve_runtime("auto", device) != "onnx":
        return network
    try:
        return OnnxNetwork(export_onnx(network, size, source="a fit's weights"))
    except WhalefastError:
        return network  # an operator ONNX cannot map: eager PyTorch gives the same outputs, only slower


class Bfloat16Network(nn.Module):
    """A PyTorch network run under bfloat16 autocast on the CPU, its outputs in float32."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.network(x).float()


def export_onnx(network: nn.Module, size: tuple[int, int], source: str) -> bytes:
    """`network` as an ONNX graph taking (batch, 3, height, width) float photos of any batch size and size, tagged with `source`.

    The graph is checked against the network before it is returned: a one-line error if their
    outputs differ by more than AGREEMENT in cosine at the size it was exported at or at a test-time
    scale.
    """
    import onnx

    buffer = io.BytesIO()
    example = torch.zeros(2, 3, *size)
    was_training = network.training
    network.eval()
    try:
        # TorchScript export: 1 s where torch.export takes 15 s for these networks, with the same graph speed and outputs.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network,
                (example,),
                buffer,
                input_names=["photos"],
                output_names=["outputs"],
                dynamic_axes={"photos": {0: "batch", 2: "height", 3: "width"}, "outputs": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as e:  # noqa: BLE001 - the exporter raises many types for an operator it cannot map
        raise WhalefastError(f"cannot export this network to ONNX ({type(e).__name__}: {str(e).splitlines()[0][:200]}); use --runtime eager") from None
    finally:
        network.train(was_training)
    model = onnx.load_from_string(buffer.getvalue())
    worst = agreement(network, OnnxNetwork(buffer.getvalue()), size)
    if worst < 1 - AGREEMENT:
        raise WhalefastError(f"the exported network's outputs differ from PyTorch's (cosine {worst:.5f} < {1 - AGREEMENT}); use --runtime eager")
    model.metadata_props.add(key=SOURCE_KEY, value=source)
    model.metadata_props.add(key=AGREEMENT_KEY, value=repr(worst))
    return model.SerializeToString()


@torch.no_grad()
def agreement(network: nn.Module, exported: nn.Module, size: tuple[int, int], seed: int = 0) -> float:
    """The lowest cosine similarity between two networks' outputs on the same random photos at `size`, 6/7 of it and 8/7 of it."""
    generator = torch.Generator().manual_seed(seed)
    was_training = network.training
    network.eval()
    try:
        worst = 1.0
        for scale, batch in ((1.0, 3), (6 / 7, 2), (8 / 7, 1)):
            x = torch.randn(batch, 3, *scaled_size(size, scale), generator=generator)
            cosine = torch.nn.functional.cosine_similarity(network(x).float().flatten(1), exported(x).float().flatten(1), dim=1)
            worst = min(worst, float(cosine.min()))
        return worst
    finally:
        network.train(was_training)


class OnnxNetwork(nn.Module):
    """An exported network run by ONNX Runtime in place of the PyTorch module it came from: same input, same output, on the CPU.

    It holds no parameters, so whalefast's views, ensembles and embed path wrap it as they wrap the module.
    """

    def __init__(self, graph: bytes | str, threads: int | None = None):
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # errors only: ORT warns about initialisers it folds
        try:
            self.session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error types for a damaged graph
            raise WhalefastError(f"{graph if isinstance(graph, str) else 'exported network'}: not a readable ONNX graph ({type(e).__name__})") from None
        self.input = self.session.get_inputs()[0].name

    @property
    def source(self) -> str | None:
        """What the graph was exported from (SOURCE_KEY in its metadata)."""
        return self.session.get_modelmeta().custom_metadata_map.get(SOURCE_KEY)

    @property
    def agreement(self) -> float | None:
        """The lowest cosine of its outputs to the network's when it was exported (`agreement`), if recorded."""
        value = self.session.get_modelmeta().custom_metadata_map.get(AGREEMENT_KEY)
        return None if value is None else float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        photos = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: photos})[0]).to(x.device)
