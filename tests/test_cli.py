"""Every command parses and shows --help, every shipped YAML recipe parses against its command, the old command
names still work without being listed, and building the command line imports no torch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import upcycle
from upcycle.cli import _ALIASES, _commands, main

RECIPES = Path(__file__).parents[1] / "recipes"
# recipe file -> the command line it is meant for (positional arguments included)
RECIPE_COMMANDS = {
    "introvert/demo.yaml": ["demo"],
    "introvert/tinyllama.yaml": ["introvert", "train-experts", "runs/x"],
    "moe/flan.yaml": ["moe", "experiment"],
    "introvert/smollm2.yaml": ["demo"],
    "introvert/smollm2-demo.yaml": ["demo"],
    "moe/smollm2.yaml": ["moe", "experiment"],
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


def _help_of(tree: dict, argv: list[str], capsys) -> str:
    from jsonargparse import auto_cli, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    with pytest.raises(SystemExit):
        auto_cli(tree, args=argv, as_positional=True)
    return capsys.readouterr().out


@pytest.mark.parametrize("path", [[], ["introvert"], ["introvert", "cluster"], ["masks", "sweep"], ["serve"]],
                         ids=lambda p: " ".join(p) or "top")
def test_help_from_the_pruned_tree_equals_the_full_tree(path, capsys):
    from upcycle.cli import _on_path

    argv = [*path, "--help"]
    assert _help_of(_on_path(_commands(), argv), argv, capsys) == _help_of(_commands(), argv, capsys)


def test_only_the_named_command_is_built_in_full():
    from upcycle.cli import _on_path

    table = _commands()
    pruned = _on_path(table, ["introvert", "cluster", "--out", "moe"])
    assert pruned["introvert"]["cluster"] is table["introvert"]["cluster"]
    assert pruned["introvert"]["evaluate"] is not table["introvert"]["evaluate"]
    assert pruned["moe"]["train"].__doc__.split("\n")[0] == table["moe"]["train"].__doc__.strip().split("\n")[0]
    assert _on_path(table, ["--config", "x.yaml"]) is table  # the YAML may name the command: keep everything


def test_every_recipe_is_mapped_and_parses(capsys):
    shipped = {str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml")}
    assert shipped == set(RECIPE_COMMANDS), "add new recipes to RECIPE_COMMANDS"
    for recipe, command in RECIPE_COMMANDS.items():
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--config", str(RECIPES / recipe), "--print_config"])
        assert exit_info.value.code == 0, recipe
        assert "lr:" in capsys.readouterr().out


def test_the_tree_has_one_group_per_method():
    table = _commands()
    assert set(table) == {"introvert", "moe", "masks", "demo", "serve", "pretrain", "make-corpus"}
    assert set(table["moe"]) - {"_help"} == {"upcycle", "train", "export-mixtral", "inspect", "experiment"}
    assert set(table["masks"]) - {"_help"} == {"train", "analyze", "export", "generate", "sweep"}


@pytest.mark.parametrize(("old", "new"), sorted(_ALIASES.items()))
def test_old_command_names_still_work_but_are_not_listed(old, new, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([old, "--help"])
    assert exit_info.value.code == 0
    assert f"{new[0]} [options] {new[1]}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert f" {old} " not in listed and f",{old}" not in listed and f"{{{old}," not in listed


def test_an_old_name_is_rewritten_with_its_options_and_a_config_file_before_it():
    from upcycle.cli import _resolve_alias

    assert _resolve_alias(["moe-train", "ckpt", "--out", "x"]) == ["moe", "train", "ckpt", "--out", "x"]
    assert _resolve_alias(["--config", "cluster", "cluster"]) == ["--config", "cluster", "introvert", "cluster"]
    assert _resolve_alias(["masks", "train", "--out", "cluster"]) == ["masks", "train", "--out", "cluster"]


def test_building_the_command_line_imports_no_torch():
    """`upcycle --help` must answer at once: the command table and its parser import configs, never torch."""
    script = """
import sys
from upcycle.cli import _commands, main
_commands()
for argv in (["--help"], ["masks", "train", "--help"], ["serve", "--help"], ["moe", "experiment", "--help"]):
    try:
        main(argv)
    except SystemExit as exit:
        assert exit.code == 0, argv
heavy = sorted(m for m in ("torch", "transformers", "numpy", "peft", "accelerate") if m in sys.modules)
assert not heavy, heavy
"""
    src = str(Path(upcycle.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
