"""``--help`` reads as written sentences and shows no value type beside a flag; docs/cli.md is generated
from the same app and its staleness check fails when the page and the app disagree."""

import importlib.util
from pathlib import Path

import typer
import typer.main
from typer.testing import CliRunner

from gi_deploy.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _help(*args: str) -> str:
    # wide enough that rich wraps nothing: a line break in the output is one the help text itself carries
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return result.output


def _commands():
    group = typer.main.get_command(app)
    ctx = typer.Context(group, info_name="gi-deploy")
    return ctx, [(name, group.get_command(ctx, name)) for name in group.list_commands(ctx)]


def test_flags_show_no_value_type():
    top = _help()
    assert "--verbose" in top and "<bool>" not in top
    for command in ("train", "infer", "export"):
        text = _help(command)
        assert "<bool>" not in text, command
        assert "--no-resume" in text or "--no-force" in text  # the flags are there, only their type is gone
        assert "<int>" in text  # options that take a value keep their type


def test_help_is_sentences_without_hard_breaks():
    top = _help()
    # infer's docstring breaks its first sentence across two source lines
    assert "score them when labels are known (class-named sub-folders, --labels, or a label column" in top
    ctx, commands = _commands()
    for name, command in commands:
        assert all("\n" not in p for p in command.help.split("\n\n")), name
        for param in command.get_params(typer.Context(command, info_name=name, parent=ctx)):
            assert "\n" not in (param.help or ""), (name, param.name)


def _reference_module():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_check_fails_when_stale(tmp_path):
    ref = _reference_module()
    page = tmp_path / "cli.md"
    assert ref.main(["--out", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert "## `gi-deploy infer`" in text and "- `--resume / --no-resume`:" in text
    assert "`--out <path>`: Predictions CSV." in text  # an option's help, from the app
    assert ref.main(["--check", "--out", str(page)]) == 0
    page.write_text(text.replace("Predictions CSV.", "Predictions file."), encoding="utf-8")
    assert ref.main(["--check", "--out", str(page)]) == 1
    page.unlink()
    assert ref.main(["--check", "--out", str(page)]) == 1
