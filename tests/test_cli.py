"""Every command parses and shows --help, and every shipped YAML recipe parses against its command."""

from pathlib import Path

import pytest

from upcycle.cli import _commands, main

RECIPES = Path(__file__).parents[1] / "recipes"
# recipe file -> the command line it is meant for (positional arguments included)
RECIPE_COMMANDS = {
    "introvert/demo.yaml": ["demo"],
    "introvert/tinyllama.yaml": ["train-experts", "runs/x"],
    "moe/flan.yaml": ["moe-experiment"],
    "introvert/smollm2.yaml": ["demo"],
    "introvert/smollm2-demo.yaml": ["demo"],
    "moe/smollm2.yaml": ["moe-experiment"],
}


def _paths(table, prefix=()):
    for name, value in table.items():
        if name.startswith("_"):
            continue
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, name))
        else:
            yield [*prefix, name]


@pytest.mark.parametrize("path", list(_paths(_commands())), ids=" ".join)
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and len(out) > 200


def test_every_recipe_is_mapped_and_parses(capsys):
    shipped = {str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml")}
    assert shipped == set(RECIPE_COMMANDS), "add new recipes to RECIPE_COMMANDS"
    for recipe, command in RECIPE_COMMANDS.items():
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--config", str(RECIPES / recipe), "--print_config"])
        assert exit_info.value.code == 0, recipe
        assert "lr:" in capsys.readouterr().out
