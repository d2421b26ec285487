"""The CLI: help and version, one-line errors naming the option, recipes merged with typed options, resume and its hint, quiet logs."""

import inspect
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from whalefast import __version__, cli
from whalefast.cli import app
from whalefast.core.errors import WhalefastError
from whalefast.data.synth import SynthConfig
from whalefast.learn.trainer import fit
from whalefast.runs.config import BoxConfig, FitConfig
from whalefast.stages.prepare import PrepareConfig

runner = CliRunner()

COMMANDS = ["synth", "prepare", "fit", "lr-find", "submit", "predict", "evaluate", "demo", "catalogue"]


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for c in COMMANDS:
        assert c in result.output


@pytest.mark.parametrize("command", COMMANDS + ["catalogue add", "catalogue show"])
def test_command_help(command):
    result = CliRunner().invoke(app, command.split() + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_unknown_arch_lists_valid_names(tmp_path):
    result = CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--arch", "vgg16"])
    assert result.exit_code == 1
    assert "unknown architecture 'vgg16'" in result.output and "resnet50" in result.output and "whale-resnet" in result.output


def test_recipe_fills_what_was_not_typed(tmp_path, monkeypatch):
    from whalefast.learn import trainer
    from whalefast.runs.recipes import RECIPES

    seen = []
    monkeypatch.setattr(trainer, "fit", lambda cfg, resume, distributed, typed: seen.append(cfg))
    result = CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--recipe", "flukes", "--epochs", "3", "--size", "64x128"])
    assert result.exit_code == 0, result.output
    cfg = seen[0]
    flukes = RECIPES["flukes"]
    assert (cfg.epochs, cfg.size) == (3, (64, 128))  # typed options win
    assert (cfg.method, cfg.arch, cfg.lr, cfg.grey, cfg.min_samples) == (flukes["method"], flukes["arch"], flukes["lr"], True, 1)
    assert cfg.name == "flukes" and cfg.recipe == "flukes"
    assert cfg.wd == flukes["wd"] == 1.0  # the recipe's weight decay, not the option's default (the reference's 1e-4)
    result = CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--recipe", "flukes", "--wd", "0.02"])
    assert result.exit_code == 0, result.output
    assert seen[1].wd == 0.02
    result = CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--recipe", "nosuch"])
    assert result.exit_code == 1 and "unknown recipe 'nosuch'; choose one of: reference, flukes" in result.output
    assert seen[0].mirror_view is flukes["mirror_view"] is True
    result = CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--recipe", "flukes", "--method", "softmax", "--no-mirror-view"])
    assert result.exit_code == 0, result.output
    assert (seen[-1].method, seen[-1].mirror_view, seen[-1].wd) == ("softmax", False, 1.0)


def test_a_recipe_setting_that_a_typed_option_rules_out_is_refused_with_its_fix(tmp_path):
    # the real fit: it checks its settings before it reads any data
    result = CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--recipe", "flukes", "--method", "softmax"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--mirror-view" in result.output and "needs --method arcface" in result.output and result.output.rstrip().endswith("add --no-mirror-view")


def test_lr_find_takes_the_same_options_as_fit():
    def options(command):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}, terminal_width=200).output
        return {word for word in text.replace("│", " ").split() if word.startswith("--")}

    assert options("fit") - options("lr-find") == {"--resume", "--no-resume", "--distributed", "--no-distributed"}


@pytest.mark.slow
def test_a_diverging_fit_stops_with_one_line_and_leaves_nothing(tiny_data, tmp_path, tiny_config, fast_fit_args):
    fast = dict(arch="whale-resnet", pretrained=False, size=32, bs=16, epochs=2, milestones=(1,), opt="sgd", lr=1e6, momentum=0.99)
    with pytest.raises(WhalefastError, match=r"diverged in epoch 0.*lower --lr \(this run used 1e\+06\)"):
        fit(tiny_config(tiny_data, tmp_path, **fast))
    assert not (tmp_path / "tiny").exists()  # a run that failed before its first epoch ended leaves no folder
    result = runner.invoke(app, ["fit", "--data", str(tiny_data), *fast_fit_args, "--epochs", "1", "--lr", "1e6", "--models-dir", str(tmp_path), "--name", "x"])
    assert result.exit_code == 1 and "diverged in epoch 0" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--milestones", "a,b"], "--milestones must be comma-separated epoch numbers"),
        (["--size", "0"], "--size must be at least 16"),
        (["--size", "12x"], "--size must be N or HEIGHTxWIDTH"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--bs", "0"], "--bs must be at least 1"),
        (["--map-every", "0"], "--map-every must be at least 1"),
        (["--opt", "rmsprop"], "--opt must be sgd or adam"),
        (["--method", "triplet"], "--method must be softmax or arcface"),
        (["--margin", "0.5", "--parts", "2"], "--margin, --parts: ArcFace settings, unused by --method softmax"),
        (["--recipe", "flukes", "--method", "softmax", "--sub-centers", "2"], "--sub-centers: ArcFace settings, unused by --method softmax"),
    ],
)
def test_each_bad_option_is_one_line_naming_it(tmp_path, args, message):
    result = runner.invoke(app, ["fit", "--data", str(tmp_path), "--arch", "whale-resnet", "--no-pretrained", *args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


def test_arcface_settings_from_a_recipe_or_at_their_defaults_pass_with_softmax(tmp_path):
    """Only a typed ArcFace setting that would change something is refused: the recipe's margin and a typed --no-mirror-view are harmless."""
    typed = {"recipe": "flukes", "method": "softmax", "mirror_view": False, "margin": 0.3}
    cfg = FitConfig.from_options({"data": str(tmp_path), **typed}, typed=set(typed))
    assert (cfg.method, cfg.margin, cfg.parts, cfg.mirror_view) == ("softmax", 0.3, 2, False)
    with pytest.raises(WhalefastError, match="--margin: ArcFace settings"):
        FitConfig.from_options({"data": str(tmp_path), "margin": 0.5}, typed={"margin"})
    assert FitConfig.from_options({"data": str(tmp_path), "margin": 0.5}).margin == 0.5  # a whole config from code: nobody typed it


@pytest.mark.slow
def test_an_interrupted_fit_says_how_to_continue_and_resume_refuses_other_options(tiny_data, tmp_path, monkeypatch, fast_fit_args):
    from whalefast.learn.callbacks import Checkpoints

    args = ["fit", "--data", str(tiny_data), *fast_fit_args, "--models-dir", str(tmp_path), "--name", "run"]
    original = Checkpoints.after_epoch

    def interrupt(self):
        original(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoints, "after_epoch", interrupt)
    result = runner.invoke(app, args)
    assert result.exit_code == 130
    assert f"whalefast fit --name run --models-dir {tmp_path} --resume" in result.output
    monkeypatch.setattr(Checkpoints, "after_epoch", original)

    changed = runner.invoke(app, ["fit", "--name", "run", "--models-dir", str(tmp_path), "--resume", "--lr", "0.5"])
    assert changed.exit_code == 1 and "--lr 0.5 (the run has 0.02)" in changed.output
    resumed = runner.invoke(app, ["fit", "--name", "run", "--models-dir", str(tmp_path), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert pd.read_csv(tmp_path / "run" / "history.csv").epoch.tolist() == [0, 1]


def option_defaults(command) -> dict:
    """Each option of `command` with its default, paths as text (as the configs hold them)."""
    params = inspect.signature(command).parameters.values()
    return {p.name: str(p.default) if isinstance(p.default, Path) else p.default for p in params if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("command, config", [(cli.synth, SynthConfig), (cli.prepare, PrepareConfig), (cli.boxes_fit, BoxConfig)])
def test_a_commands_defaults_are_its_configs(command, config):
    """The CLI cannot import the configs (they load numpy), so it repeats their defaults: this keeps the two the same."""
    defaults = option_defaults(command)
    shared = {f.name: f.default for f in fields(config) if f.name in defaults}
    assert len(shared) >= 4
    assert {name: defaults[name] for name in shared} == shared


def test_fit_and_lr_find_defaults_are_fit_configs(tmp_path):
    """Left to its defaults, fit's options make FitConfig's own defaults (its text options parsed as the CLI takes them)."""
    defaults = option_defaults(cli.training_options) | {"data": str(tmp_path)}  # no prepared data: min_samples falls to the config's
    assert FitConfig.from_options(defaults, typed=set()) == FitConfig(data=str(tmp_path))


def test_help_shows_defaults_and_whole_arch_names():
    from whalefast.nets.registry import ARCHS

    result = runner.invoke(app, ["fit", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    text = " ".join(result.output.replace("│", " ").split())
    assert " ." not in text
    assert "[default: (prepare's --min-samples)]" in text and "[default: (the recipe, or the arch for reference)]" in text
    for name in ARCHS:
        assert name in text


@pytest.mark.slow
def test_quiet_epoch_lines_when_not_a_terminal(tiny_data, tmp_path, fast_fit_args):
    result = runner.invoke(app, ["fit", "--data", str(tiny_data), *fast_fit_args, "--models-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    epoch_lines = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and "train_loss" in epoch_lines[0]
    assert "\r" not in result.output and len(result.output) < 4000


@pytest.mark.parametrize("method", ["arcface", "softmax"])
def test_the_demo_fits_the_flukes_recipe_with_either_method(tmp_path, method):
    from whalefast.runs.config import check_config
    from whalefast.stages.demo import DEMO_SIZE, demo_config

    cfg = demo_config(tmp_path, tmp_path / "models", method, epochs=6)
    check_config(cfg)  # softmax leaves out the recipe's mirror view, which compares embeddings
    assert (cfg.method, cfg.size, cfg.epochs, cfg.fold_in, cfg.wd, cfg.new_whale_share) == (method, DEMO_SIZE, 6, 0, 1.0, 0.5)
    assert cfg.mirror_view is (method == "arcface")
