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
