"""The `upcycle masks` commands refuse bad settings with one-line errors before any work."""

from __future__ import annotations

import pytest

from upcycle.errors import UserError


def test_cli_refuses_bad_targets_experts_and_bases(tmp_path, tiny_llama_dir, capsys):
    from upcycle.cli import main
    from upcycle.masks import commands

    for argv, flag in [(["train", "--recipe.target", "1.5"], "--recipe.target"),
                       (["train", "--recipe.masks.experts", "0"], "--recipe.masks.experts"),
                       (["sweep", "--targets", "[0.5, 0.0]"], "--recipe.target")]:
        assert main(["masks", *argv, "--base", str(tiny_llama_dir), "--out", str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("upcycle: error: ") and flag in err and "\n" not in err, err
    assert not (tmp_path / "a").exists()
    with pytest.raises(UserError, match="not a mask run"):
        commands.analyze(str(tmp_path))
