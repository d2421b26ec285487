"""Ensembles (fit --members N): the combination rule, a tiny ensemble fit, and resuming an interrupted one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from whalefast.core.errors import WhalefastError
from whalefast.core.spec import IMAGENET_MEAN, IMAGENET_STD
from whalefast.learn.trainer import fit, is_member_resumable
from whalefast.nets.forward import forward_photos
from whalefast.nets.views import Ensemble, average_probabilities, concatenate_unit
from whalefast.runs.config import check_config, member_config
from whalefast.runs.folder import Run


def test_an_arcface_ensemble_scores_the_mean_of_its_members_cosines():
    torch.manual_seed(0)
    members = [nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)]
    a, b = torch.randn(5, 6), torch.randn(7, 6)
    ensemble = Ensemble(members, concatenate_unit)
    ea, eb = ensemble(a), ensemble(b)
    assert ea.shape == (5, 12)
    assert torch.allclose(ea.norm(dim=1), torch.ones(5))
    mean_cosine = sum(F.normalize(m(a), dim=1) @ F.normalize(m(b), dim=1).T for m in members) / 3
    assert torch.allclose(ea @ eb.T, mean_cosine, atol=1e-6)


def test_a_softmax_ensemble_gives_the_mean_of_its_members_probabilities():
    torch.manual_seed(0)
    members = [nn.Linear(6, 4), nn.Linear(6, 4)]
    x = torch.randn(5, 6)
    probabilities = F.softmax(Ensemble(members, average_probabilities)(x), dim=1)
    assert torch.allclose(probabilities, (F.softmax(members[0](x), 1) + F.softmax(members[1](x), 1)) / 2, atol=1e-6)


def test_members_must_be_at_least_one(tmp_path, tiny_config):
    with pytest.raises(WhalefastError, match="--members must be at least 1, got 0"):
        check_config(tiny_config(tmp_path, tmp_path, members=0))


def test_an_ensemble_does_not_train_distributed(tiny_data, tmp_path, tiny_config):
    with pytest.raises(WhalefastError, match="does not run with --distributed"):
        fit(tiny_config(tiny_data, tmp_path, members=2), distributed=True)
    assert not (tmp_path / "tiny").exists()


@pytest.fixture(scope="module")
def tiny_ensemble(tiny_data, tmp_path_factory, tiny_config):
    """A two-member arcface ensemble fitted on the tiny dataset: (run dir, fit result)."""
    models = tmp_path_factory.mktemp("models")
    cfg = tiny_config(tiny_data, models, name="pair", method="arcface", embed_dim=32, scale=16.0, map_every=6, members=2)
    return models / "pair", fit(cfg)


def test_an_ensemble_is_its_members_trained_from_successive_seeds(tiny_ensemble, tiny_data, baseline_map5):
    run_dir, result = tiny_ensemble
    config = json.loads((run_dir / "config.json").read_text())
    assert config["members"] == 2
    seeds = [json.loads((run_dir / "members" / str(i) / "config.json").read_text())["seed"] for i in range(2)]
    assert seeds == [0, 1]
    first, second = (torch.load(run_dir / "members" / str(i) / "model.pth", weights_only=True) for i in range(2))
    assert any(not torch.equal(first[k], second[k]) for k in first if first[k].is_floating_point())
    assert result["valid_map5"] > baseline_map5(tiny_data) + 0.05
    assert len(result["best_epoch"]) == 2
    assert (run_dir / "curves.png").stat().st_size > 0


def test_an_ensemble_embeds_as_its_members_side_by_side(tiny_ensemble):
    run_dir, _ = tiny_ensemble
    photos = torch.randint(0, 256, (4, 48, 96, 3), dtype=torch.uint8).numpy()
    run = Run.open(run_dir)
    members = [Run.open(run.member(i).path).network() for i in range(2)]

    def outputs(network):
        return forward_photos(network, photos, IMAGENET_MEAN, IMAGENET_STD)

    expected = torch.cat([F.normalize(outputs(m), dim=1) for m in members], dim=1) / 2**0.5
    assert torch.allclose(outputs(run.network()), expected, atol=1e-5)
    assert run.catalogue().embeddings.shape[1] == 64


@pytest.mark.slow
def test_an_interrupted_ensemble_resumes_without_retraining_finished_members(tiny_data, tmp_path, monkeypatch, tiny_config, catalogue_of):
    from whalefast.learn import trainer

    cfg = tiny_config(tiny_data, tmp_path, name="pair", method="arcface", embed_dim=16, size=(32, 64), epochs=2, map_every=2, members=2)
    real = trainer.train_network

    def interrupted(member, spec, resume=False, distributed=False, more_files=None):
        if member.name == "1":
            raise KeyboardInterrupt
        return real(member, spec, resume, distributed, more_files)

    monkeypatch.setattr(trainer, "train_network", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg)
    first = tmp_path / "pair" / "members" / "0"
    weights, history = (first / "model.pth").read_bytes(), (first / "history.csv").read_text()
    assert (tmp_path / "pair" / "config.json").is_file() and not (tmp_path / "pair" / "model.pth").exists()

    monkeypatch.setattr(trainer, "train_network", real)
    result = fit(tiny_config(tiny_data, tmp_path, name="pair"), resume=True)
    assert (first / "model.pth").read_bytes() == weights and (first / "history.csv").read_text() == history
    assert len(result["best_epoch"]) == 2
    assert catalogue_of(tmp_path / "pair").embeddings.shape[1] == 32


def test_a_member_folder_left_by_another_run_is_not_resumed(tiny_data, tmp_path, tiny_config):
    cfg = tiny_config(tiny_data, tmp_path, name="pair", members=2)
    member = member_config(cfg, 1)
    assert not is_member_resumable(member)
    member.run_dir.mkdir(parents=True)
    (member.run_dir / "last.pth").write_bytes(b"")
    (member.run_dir / "config.json").write_text(json.dumps({**json.loads(json.dumps(vars(member), default=list)), "epochs": 99}))
    assert not is_member_resumable(member)
    (member.run_dir / "config.json").write_text(json.dumps(vars(member), default=list))
    assert is_member_resumable(member)
    (member.run_dir / "config.json").write_text(json.dumps({**json.loads(json.dumps(vars(member), default=list)), "tta_scales": [0.75, 1.0]}))
    assert is_member_resumable(member)  # test-time scales apply after the members are trained


def test_catalogue_add_and_predict_work_on_an_ensemble(tiny_ensemble, tmp_path, copy_run):

    import pandas as pd
    from PIL import Image

    from whalefast.data.synth import fluke_template, render_photo
    from whalefast.match.catalogue import add_to_catalogue
    from whalefast.stages.predict import predict

    run_dir = tmp_path / "pair"
    copy_run(tiny_ensemble[0], run_dir)
    template = fluke_template(seed=99, individual=12345)  # an individual no member saw
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "first.jpg").write_bytes(render_photo(template, 1)[0])
    with Image.open(tmp_path / "new" / "first.jpg") as im:
        im.resize((im.width * 4 // 5, im.height * 4 // 5)).save(tmp_path / "new" / "second.jpg", quality=80)
    pd.DataFrame({"Image": ["first.jpg"], "Id": ["w_newbie"]}).to_csv(tmp_path / "new.csv", index=False)
    summary = add_to_catalogue(run_dir, tmp_path / "new.csv", tmp_path / "new")
    assert summary["new_ids"] == 1 and summary["embedding_dim"] == 64
    assert predict([tmp_path / "new" / "second.jpg"], run_dir, top=5)[0]["matches"][0]["id"] == "w_newbie"
