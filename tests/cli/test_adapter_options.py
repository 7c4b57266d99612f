"""Adapter options are written once, on their settings dataclass's fields (model/settings.py), and
generated as ``--<kind>-<field>`` options of ``train`` (cli/_display.py ``settings_options``)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import typer
from typer.testing import CliRunner

from gi_deploy.cli import app
from gi_deploy.cli._display import settings_options
from gi_deploy.core.fields import helped
from gi_deploy.model.settings import ADAPTER_SETTINGS

runner = CliRunner()


@dataclass
class ToySettings:
    rank: int = helped(4, "Toy rank.")
    names: tuple[str, ...] = helped((), "Toy names.")
    fast: bool = helped(False, "Toy speed.")
    mode: str = helped("a", "Toy mode.", flag="how")
    hidden: float = helped(0.5, "Config files only.", cli=False)


def _toy_app(seen: dict) -> typer.Typer:
    toy = typer.Typer()

    @toy.command()
    @settings_options({"toy": ToySettings}, after="name")
    def cmd(name: str, verbose: bool = False, adapters: dict | None = None) -> None:
        seen.update(name=name, verbose=verbose, adapters=adapters)

    return toy


def test_settings_fields_become_options_that_reach_the_command_as_tables():
    seen: dict = {}
    r = runner.invoke(
        _toy_app(seen),
        ["x", "--toy-rank", "8", "--toy-names", "a.*, b.*,", "--toy-fast", "--toy-how", "b", "--verbose"],
    )
    assert r.exit_code == 0, r.output
    assert seen == {
        "name": "x",
        "verbose": True,
        "adapters": {"toy": {"rank": 8, "names": ["a.*", "b.*"], "fast": True, "mode": "b"}},
    }
    r = runner.invoke(_toy_app(seen), ["y"])  # nothing given: an empty table, so config files and defaults apply
    assert r.exit_code == 0 and seen["adapters"] == {"toy": {}}
    r = runner.invoke(_toy_app(seen), ["y", "--toy-hidden", "1"])
    assert r.exit_code == 2  # a cli=False field stays off the command line
    r = runner.invoke(_toy_app(seen), ["y", "--toy-rank", "many"])
    assert r.exit_code == 2 and "--toy-rank" in r.output  # typed as the field is (an int)


def test_train_offers_every_adapter_setting_with_its_fields_help():
    r = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"})
    assert r.exit_code == 0
    for kind, cls in ADAPTER_SETTINGS.items():
        for f in dataclasses.fields(cls):
            flag = f"--{kind}-{(f.metadata['flag'] or f.name).replace('_', '-')}"
            assert bool(re.search(rf"{flag}(?![\w-])", r.output)) == f.metadata["cli"], flag
            if f.metadata["cli"]:
                assert f.metadata["help"].split(" (")[0][:40] in r.output, f.name
