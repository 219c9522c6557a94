"""User-facing errors.

Everything a user can cause (a bad slide, a missing mpp, a wrong flag) is raised as a
``WsiNcmiError`` whose message is one line naming the file and the fix. The CLI prints that
line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class WsiNcmiError(Exception):
    """An error the user can fix; ``str(err)`` is the whole message."""


class SlideError(WsiNcmiError):
    """One slide cannot be processed. ``reason`` is a short stable code for summaries.

    Reason codes: ``empty-file``, ``unopenable``, ``unreadable``, ``missing-mpp``,
    ``implausible-mpp``, ``too-small``, ``no-tissue``, ``read-error``, ``overflow``,
    ``settings-mismatch``, ``bad-geojson``.
    """

    def __init__(self, path: str, reason: str, message: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {message}")
