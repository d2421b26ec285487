import pytest
from typer.testing import CliRunner

from whalefast import __version__
from whalefast.cli import app

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
    from whalefast import train
    from whalefast.recipes import RECIPES

    seen = []
    monkeypatch.setattr(train, "fit", lambda cfg, resume, distributed: seen.append(cfg))
    result = CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--recipe", "flukes", "--epochs", "3", "--size", "64x128"])
    assert result.exit_code == 0, result.output
    cfg = seen[0]
    flukes = RECIPES["flukes"]
    assert (cfg.epochs, cfg.size) == (3, (64, 128))  # typed options win
    assert (cfg.method, cfg.arch, cfg.lr, cfg.grey, cfg.min_samples) == (flukes["method"], flukes["arch"], flukes["lr"], True, 1)
    assert cfg.name == "flukes" and cfg.recipe == "flukes"
    result = CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--recipe", "nosuch"])
    assert result.exit_code == 1 and "unknown recipe 'nosuch'; choose one of: reference, flukes" in result.output
