"""Per-session output folders: each browser session writes under its own folder, which is
removed when the session ends (the page is closed) and, for all sessions, when the app stops."""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
from pathlib import Path


class Sessions:
    """Folders `root/<session>/<job>/` for outputs. `root` is made if missing; when the app made
    it (no `root` given), `close()` removes it whole."""

    def __init__(self, root: str | Path | None = None):
        self._owned = root is None
        self.root = Path(tempfile.mkdtemp(prefix="retarget-app-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._jobs = 0

    def job_dir(self, session: str | None, kind: str) -> Path:
        """A new, empty folder for one job of `session` (any string; only its safe characters are used)."""
        safe = re.sub(r"[^A-Za-z0-9_-]", "", session or "") or "anonymous"
        with self._lock:
            self._jobs += 1
            n = self._jobs
        d = self.root / safe / f"{n:04d}-{kind}"
        d.mkdir(parents=True, exist_ok=False)
        return d

    def end(self, session: str | None) -> None:
        """Remove everything `session` wrote."""
        safe = re.sub(r"[^A-Za-z0-9_-]", "", session or "") or "anonymous"
        shutil.rmtree(self.root / safe, ignore_errors=True)

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)
