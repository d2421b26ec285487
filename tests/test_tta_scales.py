"""Test-time scales (fit --tta-scales): the size rule, the combination rule, and a run that uses them end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import baseline_map5, tiny_fit_config
from torch import nn

from whalefast.catalogue import load_catalogue
from whalefast.ensemble import MultiScale, scaled_size, with_test_scales
from whalefast.errors import WhalefastError
from whalefast.inference import load_model, run_model
from whalefast.io import as_scales
from whalefast.train import fit


def tiny_net(n_out: int = 4) -> nn.Module:
    """A network whose output depends on the input's scale: a 3x3 convolution, then means over the four quarters."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, n_out, bias=False))


def resized(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    antialias = size[0] < x.shape[2]
    return F.interpolate(x, size=size, mode="bilinear", antialias=antialias, align_corners=False)


def test_scaled_sizes_round_to_eight_pixels():
    assert scaled_size((112, 224), 6 / 7) == (96, 192)
    assert scaled_size((112, 224), 8 / 7) == (128, 256)
    assert scaled_size((50, 100), 1.1) == (56, 112)  # 55 -> 56, 110 -> 112
    assert scaled_size((16, 16), 0.25) == (8, 8)


def test_scales_parse_from_text_fractions_and_numbers():
    assert as_scales("6/7, 1, 8/7") == (6 / 7, 1.0, 8 / 7)
    assert as_scales("0.5,1") == (0.5, 1.0)
    assert as_scales(1) == (1.0,)
    assert as_scales([0.75, 1.0]) == (0.75, 1.0)
    for bad in ("", "big", "0", "1,-1", "1/0", "4.5"):
        with pytest.raises(WhalefastError, match="--tta-scales must be comma-separated factors between 0 and 4"):
            as_scales(bad)


def test_multi_scale_arcface_scores_the_mean_of_each_scales_cosines():
    torch.manual_seed(0)
    net = tiny_net()
    a, b = (F.interpolate(torch.randn(n, 3, 8, 16), size=(32, 64), mode="bilinear") for n in (3, 5))
    model = MultiScale(net, (0.75, 1.0, 1.5), "arcface")
    ea, eb = model(a), model(b)
    assert ea.shape == (3, 12)
    sizes = [(24, 48), (32, 64), (48, 96)]
    cosines = [F.normalize(net(resized(a, s)), dim=1) @ F.normalize(net(resized(b, s)), dim=1).T for s in sizes]
    assert torch.allclose(ea @ eb.T, sum(cosines) / 3, atol=1e-5)
    assert (cosines[0] - cosines[2]).abs().max() > 0.01  # the scales are different views


def test_multi_scale_softmax_gives_the_mean_of_each_scales_probabilities():
    torch.manual_seed(0)
    net = tiny_net()
    x = torch.randn(4, 3, 32, 32)
    probabilities = F.softmax(MultiScale(net, (0.5, 1.0), "softmax")(x), dim=1)
    expected = (F.softmax(net(resized(x, (16, 16))), 1) + F.softmax(net(x), 1)) / 2
    assert torch.allclose(probabilities, expected, atol=1e-6)


def test_a_run_with_one_scale_is_not_wrapped(tmp_path):
    net = tiny_net()
    assert with_test_scales(net, tiny_fit_config(tmp_path, tmp_path)) is net
    wrapped = with_test_scales(net, tiny_fit_config(tmp_path, tmp_path, method="arcface", tta_scales="3/4,1"))
    assert isinstance(wrapped, MultiScale) and wrapped.scales == (0.75, 1.0)
    assert list(wrapped.state_dict()) == ["model." + k for k in net.state_dict()]


def test_a_run_with_test_scales_catalogues_and_scores_with_them(tiny_data, tmp_path):
    cfg = tiny_fit_config(tiny_data, tmp_path, name="scaled", method="arcface", augment="fluke", embed_dim=16, scale=16.0, map_every=6, tta_scales="3/4,1")
    result = fit(cfg)
    run_dir = tmp_path / "scaled"
    assert json.loads((run_dir / "config.json").read_text())["tta_scales"] == [0.75, 1.0]
    assert result["valid_map5"] > baseline_map5(tiny_data) + 0.05
    model, loaded, _ = load_model(run_dir, torch.device("cpu"))
    assert isinstance(model, MultiScale) and loaded.tta_scales == (0.75, 1.0)
    catalogue = load_catalogue(run_dir)
    assert catalogue["embeddings"].shape[1] == 32  # 16 per scale

    # The catalogue holds the photos' views at both scales: re-embedding its first photos by hand agrees.
    from whalefast.data import image_cache

    names = [p.split("/")[-1] for p in catalogue["photos"][:6]]
    images = image_cache(tiny_data, tiny_data / "prepared", "train", names, cfg.size, crop=True)
    arrays = [images[n] for n in names]
    network = model.model
    by_hand = torch.cat([F.normalize(run_model(MultiScale(network, (s,), "arcface"), arrays, tta=False), dim=1) for s in (0.75, 1.0)], dim=1) / 2**0.5
    assert torch.allclose(catalogue["embeddings"][:6], by_hand, atol=1e-4)

    import pandas as pd

    from whalefast.catalogue import add_to_catalogue

    photo = sorted((tiny_data / "test").iterdir())[0]
    pd.DataFrame({"Image": [photo.name], "Id": ["w_newbie"]}).to_csv(tmp_path / "new.csv", index=False)
    summary = add_to_catalogue(run_dir, tmp_path / "new.csv", tiny_data / "test")
    assert summary["new_ids"] == 1 and summary["embedding_dim"] == 32


def test_the_cli_takes_scales_from_the_recipe_or_as_typed_and_refuses_bad_ones(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from whalefast import train
    from whalefast.cli import app

    seen = []
    monkeypatch.setattr(train, "fit", lambda cfg, resume, distributed: seen.append(cfg))
    assert CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--recipe", "flukes"]).exit_code == 0
    assert CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--recipe", "flukes", "--tta-scales", "1"]).exit_code == 0
    assert CliRunner().invoke(app, ["fit", "--data", str(tmp_path)]).exit_code == 0
    assert [cfg.tta_scales for cfg in seen] == [(6 / 7, 1.0, 8 / 7), (1.0,), (1.0,)]
    result = CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--tta-scales", "1,big"])
    assert result.exit_code == 1 and "--tta-scales must be comma-separated factors" in result.output and "Traceback" not in result.output


def test_a_resume_refuses_other_scales_and_says_them_as_typed(tmp_path):
    from whalefast.train import check_resume

    saved = tiny_fit_config(tmp_path, tmp_path, tta_scales="6/7,1,8/7", size=(112, 224))
    check_resume(saved, {"tta_scales": (6 / 7, 1.0, 8 / 7), "size": (112, 224)})
    with pytest.raises(WhalefastError, match=r"--tta-scales 1 \(the run has 0\.8571,1,1\.143\); --size 128x256 \(the run has 112x224\)"):
        check_resume(saved, {"tta_scales": (1.0,), "size": (128, 256)})
