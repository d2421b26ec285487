"""Test-time scales (fit --tta-scales): the size rule, the combination rule, and a run that uses them end to end."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from whalefast.core.errors import WhalefastError
from whalefast.core.images import as_scales, scaled_size
from whalefast.data.prepared import image_cache
from whalefast.learn.trainer import fit
from whalefast.nets.forward import embed
from whalefast.nets.views import Views, average_probabilities, concatenate_unit
from whalefast.runs.folder import Run


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
    model = Views(net, (0.75, 1.0, 1.5), combine=concatenate_unit)
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
    probabilities = F.softmax(Views(net, (0.5, 1.0), combine=average_probabilities)(x), dim=1)
    expected = (F.softmax(net(resized(x, (16, 16))), 1) + F.softmax(net(x), 1)) / 2
    assert torch.allclose(probabilities, expected, atol=1e-6)


def test_one_scale_is_the_network_itself_and_the_mirror_is_averaged_in():
    torch.manual_seed(0)
    net = tiny_net()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(Views(net)(x), net(x))  # no combination rule: the raw outputs, as a run without scales gives
    assert torch.allclose(Views(net, mirror=True)(x), (net(x) + net(x.flip(3))) / 2)
    wrapped = Views(net, (0.75, 1.0), combine=concatenate_unit)
    assert list(wrapped.state_dict()) == ["model." + k for k in net.state_dict()]  # no weights of its own
    with pytest.raises(ValueError, match="several views need a rule"):
        Views(net, (0.75, 1.0))


@pytest.mark.slow
def test_a_run_with_test_scales_catalogues_and_scores_with_them(tiny_data, tmp_path, tiny_config, baseline_map5):
    cfg = tiny_config(tiny_data, tmp_path, name="scaled", method="arcface", augment="fluke", embed_dim=16, scale=16.0, map_every=6, tta_scales="3/4,1")
    result = fit(cfg)
    run_dir = tmp_path / "scaled"
    assert json.loads((run_dir / "config.json").read_text())["tta_scales"] == [0.75, 1.0]
    assert result["valid_map5"] > baseline_map5(tiny_data) + 0.05
    run = Run.open(run_dir)
    assert run.spec.scales == (0.75, 1.0) and json.loads((run_dir / "input.json").read_text())["scales"] == [0.75, 1.0]
    catalogue = run.catalogue()
    assert catalogue.embeddings.shape[1] == 32  # 16 per scale

    # The catalogue holds the photos' views at both scales: re-embedding its first photos by hand agrees.
    names = [p.split("/")[-1] for p in catalogue.photos[:6]]
    images = image_cache(tiny_data, tiny_data / "prepared", "train", names, run.spec)
    arrays = [images[n] for n in names]
    network = run.network()
    one_scale = [embed(network, arrays, replace(run.spec, scales=(s,)), concatenate_unit) for s in (0.75, 1.0)]
    by_hand = torch.cat([F.normalize(e, dim=1) for e in one_scale], dim=1) / 2**0.5
    assert torch.allclose(catalogue.embeddings[:6].float(), by_hand, atol=2e-3)  # stored as float16

    import pandas as pd

    from whalefast.match.catalogue import add_to_catalogue

    photo = sorted((tiny_data / "test").iterdir())[0]
    pd.DataFrame({"Image": [photo.name], "Id": ["w_newbie"]}).to_csv(tmp_path / "new.csv", index=False)
    summary = add_to_catalogue(run_dir, tmp_path / "new.csv", tiny_data / "test")
    assert summary["new_ids"] == 1 and summary["embedding_dim"] == 32


def test_the_cli_takes_scales_from_the_recipe_or_as_typed_and_refuses_bad_ones(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from whalefast.cli import app
    from whalefast.learn import trainer

    seen = []
    monkeypatch.setattr(trainer, "fit", lambda cfg, resume, distributed, typed: seen.append(cfg))
    assert CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--recipe", "flukes"]).exit_code == 0
    assert CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--recipe", "flukes", "--tta-scales", "1"]).exit_code == 0
    assert CliRunner().invoke(app, ["fit", "--data", str(tmp_path)]).exit_code == 0
    assert [cfg.tta_scales for cfg in seen] == [(15 / 14,), (1.0,), (1.0,)]
    result = CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--tta-scales", "1,big"])
    assert result.exit_code == 1 and "--tta-scales must be comma-separated factors" in result.output and "Traceback" not in result.output


def test_a_resume_refuses_other_scales_and_says_them_as_typed(tmp_path, tiny_config):
    from whalefast.runs.config import check_resume

    saved = tiny_config(tmp_path, tmp_path, tta_scales="6/7,1,8/7", size=(112, 224))
    check_resume(saved, {"tta_scales": (6 / 7, 1.0, 8 / 7), "size": (112, 224)})
    with pytest.raises(WhalefastError, match=r"--tta-scales 1 \(the run has 0\.8571,1,1\.143\); --size 128x256 \(the run has 112x224\)"):
        check_resume(saved, {"tta_scales": (1.0,), "size": (128, 256)})


def test_the_mirror_view_scores_the_mean_of_photo_and_mirror_cosines_at_each_scale():
    torch.manual_seed(0)
    net = tiny_net()
    a, b = torch.randn(3, 3, 32, 64), torch.randn(5, 3, 32, 64)
    model = Views(net, (0.75, 1.0), combine=concatenate_unit, mirror_view=True)
    ea, eb = model(a), model(b)
    assert ea.shape == (3, 16)
    sizes = [(24, 48), (32, 64)]
    cosines = [F.normalize(net(resized(x, s)), dim=1) @ F.normalize(net(resized(y, s)), dim=1).T for x, y in ((a, b), (a.flip(3), b.flip(3))) for s in sizes]
    assert torch.allclose(ea @ eb.T, sum(cosines) / 4, atol=1e-5)
    plain = Views(net, (0.75, 1.0), combine=concatenate_unit)
    assert (ea @ eb.T - plain(a) @ plain(b).T).abs().max() > 0.01  # the mirror images are views of their own
    with pytest.raises(ValueError, match="several views need a rule"):
        Views(net, mirror_view=True)


def with_a_whale_only_held_out(tiny_data, dst):
    """A copy of the tiny dataset where one held-out photo is the only one of its whale: a fold-in meets that id first."""
    import pandas as pd

    shutil.copytree(tiny_data, dst)
    split = pd.read_csv(dst / "prepared" / "split.csv", dtype=str, keep_default_na=False)
    photo = split.Image[(split.is_valid == "True") & (split.Id != "new_whale")].iloc[0]
    split.loc[split.Image == photo, ["Id", "target"]] = ["w_heldout", "new_whale"]
    split.to_csv(dst / "prepared" / "split.csv", index=False)
    for labels in (dst / "train.csv", dst / "prepared" / "train_clean.csv"):
        table = pd.read_csv(labels, dtype=str, keep_default_na=False)
        table.loc[table.Image == photo, "Id"] = "w_heldout"
        table.to_csv(labels, index=False)
    return dst


@pytest.mark.slow
def test_a_run_with_the_mirror_view_catalogues_photo_and_mirror_and_refuses_softmax(tiny_data, tmp_path, tiny_config, baseline_map5, monkeypatch):
    import whalefast.runs.methods as methods

    data = with_a_whale_only_held_out(tiny_data, tmp_path / "data")
    imprints = []
    original = methods.carry_over_centres
    monkeypatch.setattr(methods, "carry_over_centres", lambda head, trained, index, new=None: (imprints.append(new), original(head, trained, index, new)))
    cfg = tiny_config(data, tmp_path, name="mirrored", method="arcface", augment="fluke", embed_dim=16, scale=16.0, map_every=6, mirror_view=True, fold_in=1)
    result = fit(cfg)
    # the fold-in starts an id first seen in a held-out photo from that photo's one plain view, not the first of its test-time views
    assert len(imprints) == 1 and imprints[0].shape[1] == 16
    assert result["valid_map5"] > baseline_map5(data) + 0.05
    run = Run.open(tmp_path / "mirrored")
    assert run.spec.mirror_view and json.loads((tmp_path / "mirrored" / "input.json").read_text())["mirror_view"] is True
    catalogue = run.catalogue()
    assert catalogue.embeddings.shape[1] == 32  # 16 for the photo, 16 for its mirror image
    names = [p.split("/")[-1] for p in catalogue.photos[:4]]
    images = image_cache(tiny_data, tiny_data / "prepared", "train", names, run.spec)
    plain = embed(run.network(), [images[n] for n in names], replace(run.spec, mirror_view=False), concatenate_unit)
    assert torch.allclose(catalogue.embeddings[:4, :16].float(), F.normalize(plain, dim=1) / 2**0.5, atol=2e-3)
    with pytest.raises(WhalefastError, match="--mirror-view compares mirror images"):
        fit(tiny_config(tiny_data, tmp_path, name="soft", method="softmax", augment="fluke", mirror_view=True))
