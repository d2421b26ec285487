"""The trainer: the step schedule, SGD as torch applies it, a tiny fit that learns, exact resume, lr-find, frozen layers."""

import copy
import json
import shutil

import pandas as pd
import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import Adam
from fastai.test_utils import synth_learner
from torch import nn

from whalefast.core.errors import WhalefastError
from whalefast.learn.callbacks import STAGES, Checkpoints, StageTimes, StepSchedule, UndecayedPoolingExponents
from whalefast.learn.trainer import build_learner, fit, lr_find, sgd_like_torch
from whalefast.nets.heads import GeM
from whalefast.nets.registry import build_model, get_arch
from whalefast.runs.config import check_config


def test_step_schedule_sets_lrs_at_the_right_epochs():
    learn = synth_learner(n_trn=2)
    seen = []

    class Spy(StepSchedule):
        def before_train(self):
            seen.append(self.opt.hypers[-1]["lr"])

    learn.fit(20, lr=0.5, cbs=Spy(0.01, (16, 19), 0.1))
    assert seen == pytest.approx([0.01] * 16 + [0.001] * 3 + [0.0001])


def test_stage_times_put_each_wait_in_its_stage():
    import time

    from fastai.callback.core import Callback

    class SlowLoss(Callback):  # another callback: its time is "callbacks", not the loss's
        def after_loss(self):
            if self.training:
                time.sleep(0.02)

    class SlowStep(Callback):
        def before_step(self):
            time.sleep(0.03)

    from fastai.test_utils import synth_dbunch

    learn = synth_learner(data=synth_dbunch(bs=4, n_train=2))
    times = StageTimes(skip=2)
    start = time.perf_counter()
    learn.fit(2, lr=0.01, cbs=[SlowLoss(), SlowStep(), *times.callbacks()])
    wall = time.perf_counter() - start
    per_batch = times.per_batch()
    assert set(per_batch) == set(STAGES) and (times.batches, times.counted) == (4, 2)  # 2 batches an epoch, 2 epochs, the first 2 left out
    assert 0.05 <= per_batch["callbacks"] < 0.08
    assert per_batch["loss"] < 0.01 and per_batch["optimiser"] < 0.01 and per_batch["forward"] < 0.01
    assert sum(per_batch.values()) * times.counted < wall
    learn.fit(1, lr=0.01, cbs=[SlowLoss(), SlowStep(), *times.callbacks()])  # a second fit: its setup is no batch's data wait
    assert (times.batches, times.counted) == (6, 2) and times.per_batch()["data"] < 0.01


def test_sgd_matches_torch_sgd():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    b = copy.deepcopy(a)
    ours = sgd_like_torch(list(a.parameters()), lr=0.01, mom=0.9, wd=1e-4)
    theirs = torch.optim.SGD(b.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for step in range(5):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
        for model, opt in ((a, ours), (b, theirs)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("undecayed", [True, False])
def test_weight_decay_leaves_pooling_exponents_alone(undecayed):
    torch.manual_seed(0)
    x, y = torch.rand(64, 3, 4, 4), torch.rand(64, 1)
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:16], y[:16])), bs=16, device="cpu")
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), GeM(), nn.Linear(4, 1))
    conv = model[0].weight.detach().norm().item()
    cbs = [UndecayedPoolingExponents()] if undecayed else []
    learn = Learner(dls, model, loss_func=nn.MSELoss(), opt_func=Adam, wd=10.0, wd_bn_bias=True, cbs=cbs)
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, lr=0.01)  # 8 steps: decay alone takes a weight to 0.9 ** 8 = 0.43 of itself
    exponent = model[2].p.item()
    assert model[0].weight.norm().item() < 0.6 * conv  # the rest decays either way
    if undecayed:
        assert exponent == pytest.approx(3.0, abs=0.1)  # Adam's steps move it at most lr (0.01) each
    else:
        assert exponent < 1.5


@pytest.mark.parametrize("arch", ["efficientnet-lite0", "whale-resnet"])
def test_every_learner_trains_channels_last(arch):
    """The fit and the box model share build_learner, so both train in the faster channels-last order."""
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32), torch.rand(8, 4)
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:4], y[:4])), bs=4, device="cpu")
    learn = build_learner(dls, arch, n_out=4, pretrained=False, loss_func=nn.MSELoss())
    convs = [m.weight for m in learn.model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and m.in_channels > m.groups]
    assert convs and not any(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, lr=1e-3)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_tiny_fit_learns(tiny_softmax, tiny_data, baseline_map5):
    run_dir, result = tiny_softmax
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history.epoch) == [0, 1, 2, 3, 4, 5]
    # It learns: the training loss falls by half and the best validation loss beats the first epoch's
    # (a softmax over 10 ids on 18 validation photos overfits after a couple of epochs and moves by
    # 10 % between CPUs; the best weights are kept).
    assert history.train_loss.iloc[-1] < 0.5 * history.train_loss.iloc[0]
    assert history.valid_loss.min() < 0.9 * history.valid_loss.iloc[0] and result["valid_loss"] == pytest.approx(history.valid_loss.min())
    assert result["valid_map5"] > baseline_map5(tiny_data) + 0.05
    for f in ("config.json", "model.pth", "last.pth", "curves.png", "calibration.json"):
        assert (run_dir / f).is_file()
    assert history.lr.tolist() == pytest.approx([1e-3] * 5 + [1e-4])


def fit_interrupted(cfg, monkeypatch) -> None:
    """Fit `cfg`, interrupted after its first epoch as by Ctrl-C."""
    original = Checkpoints.after_epoch

    def interrupt(self):
        original(self)
        if self.epoch == 0:
            raise KeyboardInterrupt  # a real interruption, which fastai does not swallow

    monkeypatch.setattr(Checkpoints, "after_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit(copy.deepcopy(cfg))
    assert pd.read_csv(cfg.run_dir / "history.csv").epoch.tolist() == [0]
    monkeypatch.setattr(Checkpoints, "after_epoch", original)


def fit_interrupted_then_resumed(cfg, monkeypatch) -> pd.DataFrame:
    """Fit `cfg`, interrupted after its first epoch as by Ctrl-C, then resumed; the run's history."""
    fit_interrupted(cfg, monkeypatch)
    fit(copy.deepcopy(cfg), resume=True)
    return pd.read_csv(cfg.run_dir / "history.csv")


@pytest.mark.slow
def test_resume_continues_the_schedule_exactly(tiny_data, tmp_path, monkeypatch, tiny_config):
    settings = dict(epochs=3, milestones=(2,), arch="whale-resnet", pretrained=False, size=32, opt="sgd", lr=0.02)
    fit(tiny_config(tiny_data, tmp_path / "whole", **settings))
    history = fit_interrupted_then_resumed(tiny_config(tiny_data, tmp_path / "parts", **settings), monkeypatch)
    assert history.epoch.tolist() == [0, 1, 2]
    assert history.lr.tolist() == pytest.approx([0.02, 0.02, 0.002])
    whole = pd.read_csv(tmp_path / "whole" / "tiny" / "history.csv")
    # The optimiser's momentum and the same shuffles and augmentations after the interruption: the
    # uninterrupted run's validation losses and final weights (fastai's smoothed train loss restarts).
    assert history.valid_loss.tolist() == pytest.approx(whole.valid_loss.tolist(), rel=1e-5)
    final = [torch.load(tmp_path / run / "tiny" / "last.pth", weights_only=True)["model"] for run in ("whole", "parts")]
    assert all(torch.allclose(final[0][k].float(), final[1][k].float(), atol=1e-5) for k in final[0])


@pytest.mark.slow
def test_resume_continues_a_one_cycle_schedule(tiny_data, tmp_path, monkeypatch, capsys, tiny_config):
    # fastai's one-cycle schedule sets the lr as a NumPy scalar, which the resume state must not carry.
    settings = dict(epochs=3, arch="whale-resnet", pretrained=False, size=32, schedule="one-cycle", lr=0.02)
    whole = fit(tiny_config(tiny_data, tmp_path / "whole", **settings))
    assert whole["valid_map5"] == pytest.approx(json.loads((tmp_path / "whole" / "tiny" / "calibration.json").read_text())["valid_map5"])
    history = fit_interrupted_then_resumed(tiny_config(tiny_data, tmp_path / "parts", **settings), monkeypatch)
    log = capsys.readouterr().err.split("resuming tiny at epoch 1 of 3")[1]
    epochs = [line for line in log.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1", "2"] and all("valid_loss" in line for line in epochs)  # the skipped epoch 0 is not logged
    assert history.epoch.tolist() == [0, 1, 2]
    expected = pd.read_csv(tmp_path / "whole" / "tiny" / "history.csv").lr.tolist()
    assert history.lr.tolist() == pytest.approx(expected)
    assert expected[1] > 10 * expected[2]  # the schedule anneals: the resumed run did not start it afresh


@pytest.mark.slow
def test_a_moved_run_resumes_where_it_is_now(tiny_data, tmp_path, monkeypatch, tiny_config):
    fit_interrupted(tiny_config(tiny_data, tmp_path / "old", epochs=2, arch="whale-resnet", pretrained=False, size=32), monkeypatch)
    shutil.move(tmp_path / "old", tmp_path / "new")
    fit(tiny_config(tiny_data, tmp_path / "new", name="tiny"), resume=True)
    assert not (tmp_path / "old").exists()
    assert pd.read_csv(tmp_path / "new" / "tiny" / "history.csv").epoch.tolist() == [0, 1]


@pytest.mark.slow
def test_lr_find_plot_and_weights_unchanged(tiny_data, tmp_path, tiny_config):
    cfg = tiny_config(tiny_data, tmp_path, arch="whale-resnet", pretrained=False, size=32, bs=16)
    result = lr_find(cfg)
    assert result["weights_unchanged"]
    assert (tmp_path / "tiny" / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(v > 0 for v in result["suggestions"].values())


@pytest.mark.slow
def test_lr_find_command_prints_suggestions(tiny_data, tmp_path, fast_fit_args):
    from typer.testing import CliRunner

    from whalefast.cli import app

    result = CliRunner().invoke(app, ["lr-find", "--data", str(tiny_data), *fast_fit_args, "--models-dir", str(tmp_path), "--name", "lrf"])
    assert result.exit_code == 0, result.output
    assert "valley" in result.output and (tmp_path / "lrf" / "lr_find.png").is_file()


@pytest.mark.slow
def test_freeze_epochs_train_only_the_head_first(tiny_data, tmp_path, monkeypatch, tiny_config):
    from fastai.learner import Learner

    trainable = []
    original = Learner.fit

    def spy(self, *args, **kwargs):
        body = [p for m in self.model[0].modules() if not isinstance(m, nn.BatchNorm2d) for p in m.parameters(recurse=False)]
        trainable.append(sum(p.requires_grad for p in body) / len(body))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Learner, "fit", spy)
    fit(tiny_config(tiny_data, tmp_path, size=32, epochs=1, freeze_epochs=1, milestones=()))
    assert trainable == [0.0, 1.0]  # the body (batch-norm aside) is frozen for the first fit, then trained


@pytest.mark.slow
def test_frozen_stages_keep_their_imagenet_weights(tiny_data, tmp_path, tiny_config):
    from fastai.vision.learner import create_body

    from whalefast.nets.registry import backbone_stages

    fit(tiny_config(tiny_data, tmp_path, size=32, epochs=1, milestones=(), frozen_stages=2))
    trained = build_model("efficientnet-lite0", 1, head=nn.Identity())
    trained.load_state_dict(torch.load(tmp_path / "tiny" / "model.pth", weights_only=True), strict=False)
    imagenet = create_body(get_arch("efficientnet-lite0").build(True))

    def params(stage):
        return [p for module in stage for p in module.parameters()]

    same = [
        all(torch.equal(p, q) for p, q in zip(params(a), params(b), strict=True))
        for a, b in zip(backbone_stages(trained[0]), backbone_stages(imagenet), strict=True)
    ]
    assert same[:3] == [True, True, True]  # the stem and the first two stages
    assert not any(same[3:])  # every later stage learnt


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(frozen_stages=8), "--frozen-stages must be at most 7 for efficientnet-lite0, got 8"),
        (dict(frozen_stages=-1), "--frozen-stages must be 0 or more, got -1"),
        (dict(frozen_stages=1, pretrained=False), "--frozen-stages needs a pretrained model"),
        (dict(new_whale_share=1.0), "--new-whale-share must be at least 0 and below 1, got 1.0"),
        (dict(new_whale_share=-0.1), "--new-whale-share must be at least 0 and below 1, got -0.1"),
    ],
)
def test_frozen_stages_bad_values(tmp_path, settings, message, tiny_config):
    with pytest.raises(WhalefastError, match=message):
        check_config(tiny_config(tmp_path, tmp_path, **settings))
