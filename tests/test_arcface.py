from dataclasses import replace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from whalefast.core.errors import WhalefastError
from whalefast.core.ranking import cosine_id_scores
from whalefast.match.catalogue import add_to_catalogue
from whalefast.match.matcher import Matcher
from whalefast.nets.heads import EmbeddingHead
from whalefast.stages.predict import predict


def test_margin_zero_equals_scaled_softmax_cross_entropy():
    torch.manual_seed(0)
    head = EmbeddingHead(features=8, embed_dim=4, n_classes=3, margin=0.0, scale=10.0)
    emb = F.normalize(torch.randn(5, 4), dim=1)
    target = torch.tensor([0, 1, 2, 1, 0])
    centres = F.normalize(head.arcface.W.detach().T, dim=1)  # (classes, dim)
    expected = F.cross_entropy(10.0 * emb @ centres.T, target)
    assert float(head.arcface(emb, target)) == pytest.approx(float(expected), rel=1e-4)
    with_margin = EmbeddingHead(features=8, embed_dim=4, n_classes=3, margin=0.5, scale=10.0)
    with_margin.arcface.W.data.copy_(head.arcface.W.data)
    assert float(with_margin.arcface(emb, target)) > float(expected)  # the margin makes the true class harder


def test_dynamic_margins_fall_with_photos_and_match_arcface_when_equal():
    from pytorch_metric_learning.losses import ArcFaceLoss

    from whalefast.nets.margins import DynamicArcFaceLoss, DynamicSubCenterArcFaceLoss, class_margins

    margins = class_margins([1, 2, 4, 16], margin=0.45, power=0.25, floor=0.05)
    assert margins.tolist() == pytest.approx([0.45, 0.05 + 0.4 * 2**-0.25, 0.05 + 0.4 / 2**0.5, 0.25])
    assert class_margins([1, 9], 0.4, 0.0, 0.05).tolist() == pytest.approx([0.4, 0.4])  # power 0: one margin
    torch.manual_seed(0)
    emb, target = torch.randn(12, 8), torch.randint(0, 4, (12,))
    dynamic = DynamicArcFaceLoss(torch.full((4,), 0.4), embedding_size=8, scale=30.0)
    fixed = ArcFaceLoss(num_classes=4, embedding_size=8, margin=float(torch.rad2deg(torch.tensor(0.4))), scale=30.0)
    fixed.W.data.copy_(dynamic.W.data)
    assert float(dynamic(emb, target)) == pytest.approx(float(fixed(emb, target)), rel=1e-5)
    # A larger margin for one class raises the loss of its rows alone.
    wider = DynamicArcFaceLoss(torch.tensor([0.4, 0.4, 0.4, 0.8]), embedding_size=8, scale=30.0)
    wider.W.data.copy_(dynamic.W.data)
    rows = target == 3
    assert rows.any()
    assert float(wider(emb[rows], target[rows])) > float(dynamic(emb[rows], target[rows]))
    assert float(wider(emb[~rows], target[~rows])) == pytest.approx(float(dynamic(emb[~rows], target[~rows])), rel=1e-5)
    sub = DynamicSubCenterArcFaceLoss(margins, embedding_size=8, scale=30.0, sub_centers=2)
    assert list(sub.state_dict()) == ["W"] and sub.W.shape == (8, 8)  # checkpoints as plain sub-centre ArcFace's


def test_margin_power_uses_each_ids_training_photos(tiny_config, tmp_path):
    from whalefast.runs.config import check_config
    from whalefast.runs.methods import get_method

    cfg = tiny_config(tmp_path, tmp_path / "models", margin=0.5, margin_power=0.5, margin_floor=0.1)
    check_config(cfg)
    head = get_method("arcface").head(cfg, 3, counts=[1, 4, 0])
    assert head.arcface.margins.tolist() == pytest.approx([0.5, 0.3, 0.5])
    with pytest.raises(WhalefastError, match="--margin-floor must be at most --margin"):
        check_config(tiny_config(tmp_path, tmp_path / "models", margin=0.1, margin_power=0.5, margin_floor=0.2))


def test_ranking_scores_each_id_once_by_its_nearest_photo():
    catalogue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])  # id 1 has two photos
    query = torch.tensor([[0.8, 0.6]])
    scores = cosine_id_scores(query, catalogue, labels, n_ids=4)
    assert scores.shape == (1, 4)
    assert scores[0].tolist() == pytest.approx([0.8, 0.96, -0.8, -2.0])  # id 3 has no photo


def test_tiny_arcface_fit_learns(tiny_arcface, tiny_data, baseline_map5, catalogue_of):
    run_dir, result = tiny_arcface
    history = pd.read_csv(run_dir / "history.csv")
    assert history.valid_loss.iloc[-1] < history.valid_loss.iloc[0]
    assert history.map5.notna().tolist() == [False, False, False, True, False, True]  # map_every=4: epochs 4 and 6 (the last)
    assert result["valid_map5"] > baseline_map5(tiny_data) + 0.05
    cat = catalogue_of(run_dir)
    assert cat.embeddings.shape[1] == 64 and len(cat.photos) == cat.embeddings.shape[0]


def test_catalogue_add_makes_a_new_whale_findable(tiny_arcface, tmp_path, catalogue_of, copy_run):
    from whalefast.data.synth import fluke_template, render_photo

    run_dir = tmp_path / "arcface"
    copy_run(tiny_arcface[0], run_dir)  # the session's model stays as it was
    template = fluke_template(seed=99, individual=12345)  # an individual the model never saw
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "first.jpg").write_bytes(render_photo(template, 1)[0])
    with Image.open(tmp_path / "new" / "first.jpg") as im:  # another photo of the same encounter: smaller, re-encoded
        im.resize((im.width * 4 // 5, im.height * 4 // 5)).save(tmp_path / "new" / "second.jpg", quality=80)
    pd.DataFrame({"Image": ["first.jpg"], "Id": ["w_newbie"]}).to_csv(tmp_path / "new.csv", index=False)
    before = catalogue_of(run_dir)
    summary = add_to_catalogue(run_dir, tmp_path / "new.csv", tmp_path / "new")
    assert summary["new_ids"] == 1 and summary["ids"] == len(before.ids) + 1
    ranked = predict([tmp_path / "new" / "second.jpg"], run_dir, top=5)[0]["matches"]
    assert ranked[0]["id"] == "w_newbie"


def test_only_models_trained_on_mirror_images_average_with_the_mirror(tiny_arcface, tmp_path, copy_run):
    import json

    import numpy as np

    photos = np.random.default_rng(0).integers(0, 256, size=(3, 48, 96, 3), dtype=np.uint8)
    reference = Matcher(tiny_arcface[0])  # trained with random flips: averages each photo with its mirror image
    unmirrored = Matcher(tiny_arcface[0], tta=False).outputs(photos)
    assert reference.spec.mirror and not torch.allclose(reference.outputs(photos), unmirrored)
    run_dir = tmp_path / "fluke"
    copy_run(tiny_arcface[0], run_dir)
    spec = json.loads((run_dir / "input.json").read_text())
    (run_dir / "input.json").write_text(json.dumps({**spec, "mirror": False}))  # as if trained never mirrored
    fluke = Matcher(run_dir)  # another input spec: another model to the catalogue, which it embeds anew
    assert torch.equal(fluke.outputs(photos), unmirrored)
    assert len(fluke.catalogue) == len(reference.catalogue) and fluke.model != reference.model
    assert not torch.allclose(fluke.catalogue.embeddings.float(), reference.catalogue.embeddings.float(), atol=1e-3)  # its own, unmirrored


def test_the_training_time_map5_is_scored_as_calibration_scores_it(tiny_arcface, tiny_data):
    from types import SimpleNamespace

    from whalefast.data.loaders import TrainingData, training_items
    from whalefast.data.prepared import image_cache, load_split
    from whalefast.learn.callbacks import ValidationMAP
    from whalefast.runs.folder import Run

    run_dir, result = tiny_arcface
    run = Run.open(run_dir)
    items, vocab = training_items(load_split(tiny_data / "prepared"))
    data = TrainingData(None, items, vocab, image_cache(tiny_data, tiny_data / "prepared", "train", items.Image.tolist(), run.spec))
    metric = ValidationMAP(run.method, run.spec, data, bs=32)
    metric.learn = SimpleNamespace(epoch=5, n_epoch=6, model=run.network())  # the last epoch, with the best weights
    metric.before_validate()
    assert metric.map5 == pytest.approx(result["valid_map5"], abs=1e-6) and metric.top1 == pytest.approx(result["valid_top1"], abs=1e-6)


@pytest.mark.slow
def test_calibration_uses_the_last_scored_epochs_outputs_when_they_are_the_best(tiny_data, tmp_path, tiny_config, monkeypatch):
    from whalefast.learn.trainer import fit
    from whalefast.runs.methods import ArcFace

    calls = []
    embed = ArcFace.embed
    monkeypatch.setattr(ArcFace, "embed", lambda self, network, arrays, *a, **k: calls.append(len(arrays)) or embed(self, network, arrays, *a, **k))
    result = fit(tiny_config(tiny_data, tmp_path, method="arcface", embed_dim=16, scale=16.0, size=(32, 64), epochs=1, milestones=()))
    history = pd.read_csv(tmp_path / "tiny" / "history.csv")
    # One epoch, so it is the best: its MAP@5 embedded the training and the validation photos once, and calibration embeds nothing more.
    assert len(calls) == 2 and result["best_epoch"] == 0
    assert history.map5.iloc[0] == pytest.approx(result["valid_map5"], abs=1e-6)


def test_training_items_for_every_photo_train_the_held_out_photos_too():
    from whalefast.data.loaders import training_items

    split = pd.DataFrame(
        {
            "Image": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"],
            "Id": ["w_1", "w_1", "w_2", "new_whale", "w_3"],
            "is_valid": [False, True, False, False, True],
            "target": ["w_1", "w_1", "w_2", "new_whale", "new_whale"],  # w_3's only photo is held out: an unseen whale
        }
    )
    items, vocab = training_items(split)
    assert vocab == ["w_1", "w_2"] and items[~items.is_valid].Image.tolist() == ["a.jpg", "c.jpg"]
    items, vocab = training_items(split, every_photo=True)
    assert vocab == ["w_1", "w_2", "w_3"]
    assert items[~items.is_valid].Image.tolist() == ["a.jpg", "b.jpg", "c.jpg", "e.jpg"]  # new_whale photos still learn nothing
    assert items[items.is_valid].Image.tolist() == ["b.jpg", "e.jpg"] and items[items.is_valid].label.tolist() == ["w_1", "new_whale"]


def test_class_centres_follow_their_ids_and_a_new_id_starts_at_its_photos():
    from whalefast.nets.heads import carry_over_centres

    torch.manual_seed(0)
    trained = EmbeddingHead(features=8, embed_dim=4, n_classes=3, margin=0.4, scale=10.0, sub_centers=2, parts=1)
    head = EmbeddingHead(features=8, embed_dim=4, n_classes=4, margin=0.4, scale=10.0, sub_centers=2, parts=1)
    index = torch.tensor([2, -1, 0, 1])  # the new vocabulary's class 1 is an id the trained head never saw
    imprints = torch.randn(4, 3 * 4)  # the sum of its photos' outputs: 3 branches (whole, 2 strips) of 4 numbers
    carry_over_centres(head, trained, index, imprints)
    for b, (new, old) in enumerate(zip(head.losses, trained.losses)):
        assert new.W.shape == (4, 8) and old.W.shape == (4, 6)
        for i, j in ((0, 2), (2, 0), (3, 1)):
            assert torch.equal(new.W[:, 2 * i : 2 * i + 2], old.W[:, 2 * j : 2 * j + 2])  # both sub-centres
        imprint = F.normalize(imprints[1, 4 * b : 4 * b + 4], dim=0) * old.W.norm(dim=0).mean()
        assert torch.allclose(new.W[:, 2], imprint) and torch.allclose(new.W[:, 3], imprint)


def test_a_classifiers_rows_follow_their_ids_and_a_new_id_keeps_its_fresh_row():
    from torch import nn

    from whalefast.nets.heads import carry_over_classifier

    torch.manual_seed(0)
    trained, network = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
    fresh = network[2].weight.detach().clone()
    carry_over_classifier(network, trained, torch.tensor([1, -1, 2, 0]))
    assert torch.equal(network[2].weight[[0, 2, 3]], trained[2].weight[[1, 2, 0]])
    assert torch.equal(network[2].bias[[0, 2, 3]], trained[2].bias[[1, 2, 0]])
    assert torch.equal(network[2].weight[1], fresh[1])


def interrupted_after(after_epoch, epochs: int):
    """Checkpoints.after_epoch that stops the fit with Ctrl-C once `epochs` epochs (of all its runs) are saved."""
    calls = []

    def interrupt(self):
        after_epoch(self)
        calls.append(1)
        if len(calls) == epochs:
            raise KeyboardInterrupt

    return interrupt


@pytest.mark.slow
def test_fold_in_goes_on_from_the_validation_runs_network_and_resumes_where_it_stopped(tiny_data, tmp_path, tiny_config, monkeypatch):
    from whalefast.learn.callbacks import Checkpoints
    from whalefast.learn.trainer import fit
    from whalefast.runs.folder import Run

    cfg = tiny_config(tiny_data, tmp_path / "models", name="fold", method="arcface", embed_dim=32, scale=16.0, epochs=2, map_every=2, fold_in=2)
    result = fit(cfg)
    validation, final = Run.open(tmp_path / "models" / "fold" / "validation"), Run.open(tmp_path / "models" / "fold")
    assert validation.calibration["threshold"] == result["threshold"] == final.threshold
    assert final.settings.fold_in == 2 and final.settings.epochs == 2 and validation.settings.fold_in == 0  # the run records the settings as given
    assert set(validation.learnt.vocab) <= set(final.learnt.vocab)
    first, folded = pd.read_csv(validation.path / "history.csv"), pd.read_csv(final.path / "history.csv")
    assert len(first) == 2 and len(folded) == 2
    assert folded.train_loss.iloc[0] < first.train_loss.iloc[0]  # it starts from the trained network, not from ImageNet
    assert final.weights_digest != validation.weights_digest

    original = Checkpoints.after_epoch
    for name, stop_at in (("in-the-fold-in", 3), ("in-the-first-run", 1)):  # after the fold-in's first epoch; after the first run's
        monkeypatch.setattr(Checkpoints, "after_epoch", interrupted_after(original, stop_at))
        again = replace(cfg, name=name)
        with pytest.raises(KeyboardInterrupt):
            fit(again)
        monkeypatch.setattr(Checkpoints, "after_epoch", original)
        resumed = fit(again, resume=True)
        assert resumed["threshold"] == pytest.approx(result["threshold"], abs=1e-6)
        history = pd.read_csv(tmp_path / "models" / name / "history.csv")
        # the same weights as the uninterrupted run (train_loss is fastai's running mean, which starts again on resume)
        assert history.epoch.tolist() == [0, 1] and history.valid_loss.tolist() == pytest.approx(folded.valid_loss.tolist(), rel=1e-5)
        assert resumed["refit_valid_loss"] == pytest.approx(result["refit_valid_loss"], rel=1e-5)
    for wrong, message in (
        (dict(refit=True), "choose one"),
        (dict(members=2), r"--fold-in 2 trains one network twice; it does not combine with --members \(add --fold-in 0"),
    ):
        with pytest.raises(WhalefastError, match=message):
            fit(replace(cfg, **wrong))
    with pytest.raises(WhalefastError, match="does not run with --distributed"):
        fit(cfg, distributed=True)


def test_fold_in_within_needs_fewer_fold_in_epochs_than_epochs_and_without_any_is_a_plain_run(tmp_path):
    from whalefast.runs.config import FitConfig, check_config

    recipe = FitConfig.from_options({"data": str(tmp_path), "recipe": "flukes", "min_samples": 1})
    assert recipe.fold_in_within and 0 < recipe.fold_in < recipe.epochs
    ensemble = replace(recipe, fold_in=0, members=2)  # what the README asks of an ensemble of the flukes recipe
    check_config(ensemble)
    assert not ensemble.refits
    for fold_in in (recipe.epochs, recipe.epochs + 1):
        with pytest.raises(WhalefastError, match=rf"--fold-in-within .* --fold-in must be under --epochs, got {fold_in} and {recipe.epochs}"):
            check_config(replace(recipe, fold_in=fold_in))


@pytest.mark.slow
def test_fold_in_within_trains_the_schedules_last_epochs_on_every_photo(tiny_data, tmp_path, tiny_config, monkeypatch):
    from whalefast.learn.callbacks import Checkpoints
    from whalefast.learn.trainer import fit
    from whalefast.runs.folder import Run

    settings = dict(method="arcface", embed_dim=32, scale=16.0, epochs=3, map_every=3, schedule="one-cycle")
    plain = fit(tiny_config(tiny_data, tmp_path / "models", name="plain", **settings))
    cfg = tiny_config(tiny_data, tmp_path / "models", name="within", fold_in=1, fold_in_within=True, **settings)
    result = fit(cfg)
    validation, final = Run.open(tmp_path / "models" / "within" / "validation"), Run.open(tmp_path / "models" / "within")
    whole = pd.read_csv(tmp_path / "models" / "plain" / "history.csv")
    first, folded = pd.read_csv(validation.path / "history.csv"), pd.read_csv(final.path / "history.csv")
    # the first run is the plain run's first 2 epochs, scored and calibrated at its last; the fold-in is the third on every photo
    assert first.epoch.tolist() == [0, 1] and folded.epoch.tolist() == [2]
    assert first.valid_loss.tolist() == pytest.approx(whole.valid_loss[:2].tolist(), rel=1e-5)
    assert first.lr.tolist() + folded.lr.tolist() == pytest.approx(whole.lr.tolist(), rel=1e-6)  # one schedule across both stages
    assert not pd.isna(first.map5.iloc[-1]) and pd.isna(whole.map5.iloc[1])  # scored where the first run ends, not only at the schedule's end
    assert result["threshold"] == validation.calibration["threshold"] != plain["threshold"]
    assert final.settings.fold_in_within and not validation.settings.fold_in_within and final.weights_digest != validation.weights_digest

    original = Checkpoints.after_epoch
    monkeypatch.setattr(Checkpoints, "after_epoch", interrupted_after(original, 2))  # the first run done, the fold-in not begun
    again = replace(cfg, name="again")
    with pytest.raises(KeyboardInterrupt):
        fit(again)
    monkeypatch.setattr(Checkpoints, "after_epoch", original)
    resumed = fit(again, resume=True)
    assert resumed["threshold"] == pytest.approx(result["threshold"], abs=1e-6)
    assert pd.read_csv(tmp_path / "models" / "again" / "history.csv").valid_loss.tolist() == pytest.approx(folded.valid_loss.tolist(), rel=1e-5)


@pytest.mark.slow
def test_refit_trains_on_every_photo_and_keeps_the_validation_runs_threshold(tiny_data, tmp_path, tiny_config, catalogue_of):
    from whalefast.learn.trainer import fit
    from whalefast.runs.folder import Run

    cfg = tiny_config(
        tiny_data, tmp_path / "models", name="refit", method="arcface", embed_dim=32, scale=16.0, epochs=2, map_every=2, refit=True, catalogue_dims=8
    )
    result = fit(cfg)
    validation = Run.open(tmp_path / "models" / "refit" / "validation")
    final = Run.open(tmp_path / "models" / "refit")
    assert validation.calibration["threshold"] == result["threshold"] == final.threshold
    assert result["valid_map5"] == validation.calibration["valid_map5"]
    assert final.settings.refit and not validation.settings.refit
    held_out_ids = set(pd.read_csv(tiny_data / "prepared" / "split.csv").query("is_valid and Id != 'new_whale'").Id)
    assert held_out_ids and held_out_ids <= set(final.learnt.vocab) and set(validation.learnt.vocab) <= set(final.learnt.vocab)
    assert final.weights_digest != validation.weights_digest
    catalogue = catalogue_of(final.path)
    assert len(catalogue.photos) == len(set(catalogue.photos))  # each labelled photo catalogued once
    assert not (tmp_path / "models" / "refit" / "validation" / "catalogue.db").exists()
    assert not any(p.name == "catalogue.db" for p in (tmp_path / "models" / "refit").iterdir())  # the validation run catalogued nothing
    assert validation.projection is not None and catalogue.embeddings.shape[1] == 8  # but it can match as it would have (its projection is saved)
    resumed = fit(cfg, resume=True)  # a finished refit: nothing left to train, the same model
    assert resumed["threshold"] == pytest.approx(result["threshold"], abs=1e-6)  # calibrated again from the same weights
    assert Run.open(final.path).weights_digest == final.weights_digest
