"""The expert directory watcher, and the `serve` entry point's safety checks."""

from __future__ import annotations

import shutil

import pytest

from upcycle.errors import UserError
from upcycle.serving.cache import AdapterCache
from upcycle.serving.commands import is_loopback, serve
from upcycle.serving.watch import ExpertDirectoryWatcher


class _Slots:
    n_slots = 1

    def pack(self, weights):
        return weights

    def load_slot(self, slot, packed) -> None:
        pass


def test_watcher_registers_new_and_unregisters_vanished_experts(fake_run_dir, tmp_path):
    experts = tmp_path / "experts"
    shutil.copytree(fake_run_dir / "experts", experts)
    cache = AdapterCache(_Slots())
    removed = []
    cache.add_removal_hook(removed.append)
    watcher = ExpertDirectoryWatcher(experts, cache)
    added, _ = watcher.scan_once()
    assert added == ["expert-00000", "expert-00001", "expert-00002", "expert-00003"]
    shutil.copytree(experts / "expert-00001", experts / "expert-00007")
    (experts / ".expert-00008.tmp").mkdir()  # half-written dirs are ignored
    shutil.rmtree(experts / "expert-00002")
    assert watcher.scan_once() == (["expert-00007"], ["expert-00002"])
    assert removed == ["expert-00002"] and cache.experts()[-1] == "expert-00007"
    assert watcher.scan_once() == ([], [])
    cache.close()


def test_serve_refuses_to_bind_beyond_localhost_without_a_key(fake_run_dir, monkeypatch):
    monkeypatch.delenv("UPCYCLE_API_KEY", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    with pytest.raises(UserError, match="api_key"):
        serve(str(fake_run_dir), host="0.0.0.0")
    with pytest.raises(UserError, match="not a run directory"):
        serve(str(fake_run_dir / "experts"))
