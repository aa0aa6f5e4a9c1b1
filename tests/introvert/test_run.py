"""`Run` reads run.json once and keeps it current through its own writes; entry points take a Run or a path."""

from __future__ import annotations

import json
import pickle

import pytest

from upcycle.errors import UserError
from upcycle.introvert import run as run_module
from upcycle.introvert.run import Run
from upcycle.io import read_json


def test_meta_is_read_once_and_kept_current_by_writes(tmp_path, monkeypatch):
    run = Run.create(tmp_path / "run", base="tiny", data="stdlib")
    reads = []
    monkeypatch.setattr(run_module, "read_json", lambda path: reads.append(path) or read_json(path))
    opened = Run.open(run.path)
    assert opened.base == "tiny" and opened.meta["data"] == "stdlib" and opened.base == "tiny"
    assert len(reads) == 1  # three accesses, one read
    opened.update_meta(experts={"config": {"lr": 0.002}})
    opened.record_command("upcycle train-experts run")
    assert opened.meta["experts"] == {"config": {"lr": 0.002}}
    assert opened.meta["commands"] == ["upcycle train-experts run"]
    on_disk = json.loads((run.path / "run.json").read_text())
    assert on_disk["experts"] == opened.meta["experts"] and on_disk["commands"] == opened.meta["commands"]
    assert len(reads) == 1
    assert pickle.loads(pickle.dumps(opened)).meta == opened.meta  # what worker processes receive


def test_of_takes_an_open_run_or_a_path(tmp_path):
    run = Run.create(tmp_path / "run", base="tiny")
    assert Run.of(run) is run
    assert Run.of(str(run.path)).path == run.path
    with pytest.raises(UserError, match="not a run directory"):
        Run.of(tmp_path)
