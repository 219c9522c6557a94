"""Per-slide lock files, so several processes or nodes can share one output folder.

A lock is created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and NFSv3+) and holds
the owner's host, pid and start time. The owner touches it while it works (``refresh``). A lock
is stale when its owner is on this host and its pid is gone, or when it has not been touched for
``stale_after`` seconds (an owner on another node that died). A stale lock is broken by renaming
it to a unique name first, so two processes that both see it stale cannot both take the slide.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_owner(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_stale(path: Path, stale_after: float) -> bool:
    owner = read_owner(path)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if owner is None:  # half-written by a process that died between create and write
        return age > 60
    if owner.get("host") == HOST:
        return not _pid_alive(int(owner.get("pid", -1)))
    return age > stale_after


class SlideLock:
    def __init__(self, lock_dir: str | Path, slide_id: str, stale_after: float = 3600.0):
        self.path = Path(lock_dir) / f"{slide_id}.lock"
        self.stale_after = stale_after
        self.held = False
        self._last_touch = 0.0

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not is_stale(self.path, self.stale_after) or not self._break():
                    return False
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"host": HOST, "pid": os.getpid(), "started": time.time()}, fh)
            self.held = True
            self._last_touch = time.time()
            return True
        return False

    def _break(self) -> bool:
        """Move a stale lock aside; only the process whose rename succeeds may retry."""
        tomb = self.path.with_name(f"{self.path.name}.stale.{HOST}.{os.getpid()}")
        try:
            os.rename(self.path, tomb)
        except FileNotFoundError:
            return True  # someone else broke it; race for the fresh create
        # if what we moved is not stale any more (it was re-created in between), put it back
        if not is_stale(tomb, self.stale_after):
            try:
                os.link(tomb, self.path)
            except FileExistsError:
                pass
            tomb.unlink(missing_ok=True)
            return False
        tomb.unlink(missing_ok=True)
        return True

    def refresh(self, every: float = 30.0) -> None:
        if self.held and time.time() - self._last_touch > every:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass
            self._last_touch = time.time()

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
