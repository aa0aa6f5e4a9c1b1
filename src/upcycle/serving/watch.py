"""Keep the served experts in step with a directory: new expert dirs are registered, vanished ones removed."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from upcycle.serving.adapters import WEIGHTS_NAME
from upcycle.serving.cache import AdapterCache

log = logging.getLogger(__name__)

EXPERT_DIR = re.compile(r"^expert-\d{5}$")


class ExpertDirectoryWatcher:
    """Polls `root` every `interval_s` seconds (no inotify dependency; thousands of entries scan in milliseconds).

    Only directories that are complete (their weights file exists; the run contract renames a finished expert dir
    into place) count. Experts registered some other way (the admin endpoint) are left alone.
    """

    def __init__(self, root: str | Path, cache: AdapterCache, interval_s: float = 2.0) -> None:
        self.root, self.cache, self.interval_s = Path(root), cache, interval_s
        self._known: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scan_once(self) -> tuple[list[str], list[str]]:
        """Register new or rewritten experts and unregister vanished ones; returns (added or updated, removed)."""
        present = {}
        if self.root.is_dir():
            present = {p.name: p for p in self.root.iterdir()
                       if EXPERT_DIR.match(p.name) and (p / WEIGHTS_NAME).is_file()}
        changed = [name for name, path in sorted(present.items()) if self.cache.register(name, path)]
        removed = [name for name in sorted(self._known - set(present)) if self.cache.unregister(name)]
        self._known = set(present)
        if changed or removed:
            log.info("expert directory %s: %d added or updated, %d removed", self.root, len(changed), len(removed))
        return changed, removed

    def start(self) -> ExpertDirectoryWatcher:
        self.scan_once()
        self._thread = threading.Thread(target=self._loop, name="expert-watcher", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.scan_once()
            except OSError:
                log.exception("scanning %s failed", self.root)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
